"""Offloaded layers streamed one layer ahead (models/offload.py): same answers as the plain model,
one copy per layer per forward pass, accelerate's copies and hooks gone.

On a CPU the streamer runs with plain copies and no CUDA streams, so these tests check the
bookkeeping (packing, views into shared slots, which layer is in which slot when) on the real
hook path; the CUDA stream ordering is checked on a GPU in test_gpu.py.
"""

import pytest
import torch

from models.offload import ALIGN, LayerStreamer, drop_alignment_hooks, stream_offloaded_layers

PROMPT = [5, 17, 33, 2, 9, 41, 7]


def greedy(model, n=12):
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(PROMPT):].tolist()


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return greedy(load(tiny_llama))


# Layer copies after n forward passes. Layer j computes from slot j % 2; a layer alone in its
# slot is copied once and stays there. 3 layers: L1 stays, L0 and L2 take turns in slot 0
# (L0 is refilled after L2 for the next pass). 4 layers: all four each pass, plus L0's and L1's
# first copies (after the last pass, L0 and L1 are already in for a next one).
COPIES = {1: lambda n: 1, 2: lambda n: 2, 3: lambda n: 2 + 2 * n, 4: lambda n: 2 + 4 * n}


@pytest.mark.parametrize("offloaded", [1, 2, 3, 4])
def test_streamed_layers_answer_like_the_plain_model(tiny_llama, reference, offloaded):
    model = load(tiny_llama)
    names = [f"model.layers.{i}" for i in range(4 - offloaded, 4)]
    streamer = stream_offloaded_layers(model, names, "cpu")
    forwards = count_forwards(model)
    assert greedy(model) == reference
    assert len(forwards) == 12
    assert streamer.copies == COPIES[offloaded](len(forwards))
    assert len(streamer.slots) == min(2, offloaded)


@pytest.mark.parametrize("offloaded", [3, 4])
def test_a_slot_is_refilled_as_soon_as_its_layer_has_run(tiny_llama, offloaded):
    # Once a layer has run, its slot is refilled for the next layer that reads it, without waiting
    # for the host to reach the layer before: at the end of a pass (while the token is sampled
    # and the GPU-resident layers run) the next pass's first layers are already on their way.
    model = load(tiny_llama)
    streamer = stream_offloaded_layers(model, [f"model.layers.{i}" for i in range(4 - offloaded, 4)], "cpu")
    layers = streamer.layers
    seen = []
    for j, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, out, j=j: seen.append((j, list(streamer.filled_with))))
    with torch.inference_mode():
        model(torch.tensor([PROMPT]))
    assert streamer.filled_with == [0, 1]  # L0 and L1 (L1 in its own slot) ready for the next pass
    for j, filled in seen:
        assert filled[streamer.slot_of(j)] == streamer.next_user[j]  # refilled by the layer's own hook
    if offloaded == 4:
        # The earlier schedule (a copy issued when the host reaches the layer before) leaves the
        # last layer in its slot: the next pass's second layer waits for the host.
        streamer.prefetch_after_use = False
        with torch.inference_mode():
            model(torch.tensor([PROMPT]))
        assert streamer.filled_with == [0, 3]


def test_layers_share_two_slots_and_keep_one_packed_host_copy(tiny_llama):
    model = load(tiny_llama)
    layers = [model.model.layers[i] for i in (1, 2, 3)]
    sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
    streamer = LayerStreamer(layers, "cpu")
    # Layer j's weights are views into slot j % 2: layers 1 and 3 share their storage.
    ptr = lambda layer: layer.mlp.gate_proj.weight.data_ptr()  # noqa: E731
    assert ptr(layers[0]) == ptr(layers[2]) != ptr(layers[1])
    [gate] = [spec for spec in streamer.specs[0] if (spec.module, spec.name) == ("mlp.gate_proj", "weight")]
    assert ptr(layers[0]) == streamer.slots[0].data_ptr() + gate.offset
    for size, host in zip(sizes, streamer.host):
        assert size <= host.numel() <= size + ALIGN * 9  # packed, each tensor aligned
    assert streamer.device_bytes == 2 * max(h.numel() for h in streamer.host)


def test_accelerate_offload_hooks_are_replaced(tiny_llama, tmp_path, reference):
    # On a CPU machine accelerate offloads to disk (to the CPU it only offloads from a GPU):
    # the layer's weights are on the meta device and its hook reads them from a weights map,
    # the same structure as a GPU model's CPU-offloaded layers.
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "disk"}
    model = load(tiny_llama, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    layer = model.model.layers[2]
    assert hasattr(layer, "_hf_hook") and layer.mlp.up_proj.weight.device.type == "meta"
    assert not drop_alignment_hooks(model, "cpu")  # layers still on disk: accelerate's hooks must stay
    assert hasattr(model.model.layers[0], "_hf_hook")
    stream_offloaded_layers(model, ["model.layers.1", "model.layers.2", "model.layers.3"], "cpu")
    assert not hasattr(layer, "_hf_hook") and layer.mlp.up_proj.weight.device.type == "cpu"
    assert greedy(model) == reference
    # Every weight is now on the compute device: the hooks left on the other modules only cost host time.
    assert drop_alignment_hooks(model, "cpu")
    assert not [name for name, module in model.named_modules() if hasattr(module, "_hf_hook")]
    assert greedy(model) == reference


def test_an_aborted_pass_leaves_the_next_one_right(tiny_llama, reference):
    # Stop or an error can end a forward pass between layers; the next pass must still see
    # each layer's own weights (the slots are filled by whoever runs next, not by a fixed plan).
    model = load(tiny_llama)
    stream_offloaded_layers(model, ["model.layers.1", "model.layers.2", "model.layers.3"], "cpu")

    def explode(*args):
        raise RuntimeError("interrupted")

    handle = model.model.layers[2].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="interrupted"), torch.inference_mode():
        model(torch.tensor([PROMPT]))
    handle.remove()
    assert greedy(model) == reference


def test_accelerates_ram_copies_are_dropped_once_packed():
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    from models.offload import _forget_offloaded_copy

    loader = OffloadedWeightsLoader(state_dict={"model.layers.3.mlp.up_proj.weight": torch.ones(2),
                                                "model.layers.4.mlp.up_proj.weight": torch.ones(2)})
    _forget_offloaded_copy(PrefixedDataset(loader, "model.layers.3.mlp.up_proj."), "weight")
    assert list(loader.state_dict) == ["model.layers.4.mlp.up_proj.weight"]


def test_weights_on_the_device_count_each_slot_once(tiny_llama):
    from models.placement import weights_on_device_bytes

    model = load(tiny_llama)
    before = weights_on_device_bytes(model, "cpu")
    layer_size = sum(p.numel() * p.element_size() for p in model.model.layers[3].parameters())
    stream_offloaded_layers(model, ["model.layers.1", "model.layers.2", "model.layers.3"], "cpu")
    # Three layers became views into two slots: one layer's weights fewer are resident.
    assert weights_on_device_bytes(model, "cpu") == before - layer_size


def test_no_layers_is_an_error():
    with pytest.raises(ValueError):
        LayerStreamer([], "cpu")


def test_the_copy_rate_probe_is_a_cuda_measurement(tiny_llama):
    """On a CPU there is no copy stream to time: the probe says so instead of timing plain copies."""
    model = load(tiny_llama)
    streamer = stream_offloaded_layers(model, ["model.layers.3"], "cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        streamer.copy_rate()
