"""The GEMV tile chooser (models/kernels/gemv_tiles.py): tiles timed as decode runs them, kept on disk."""
import json

import pytest
import torch

from models.kernels import gemv_tiles
from models.kernels.int4 import Int4Linear, dequantize_reference, share_workspace

SIGNATURE = {"triton": "3.9.0", "tiles": ["a", "b"]}


def test_stored_choices_round_trip(tmp_path):
    path = tmp_path / "stack" / gemv_tiles.TILES_FILE
    gemv_tiles.write_choices(path, SIGNATURE, {"4096x4096": 1, "512x64": 0})
    assert gemv_tiles.read_choices(path, SIGNATURE) == {"4096x4096": 1, "512x64": 0}
    assert not list(path.parent.glob("*.tmp"))  # written whole, then renamed


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"signature": 3}', '{"choices": {}}',
                                     json.dumps({"signature": SIGNATURE, "choices": {"1x1": "two"}})])
def test_a_corrupt_file_is_ignored(tmp_path, content):
    path = tmp_path / gemv_tiles.TILES_FILE
    path.write_text(content)
    assert gemv_tiles.read_choices(path, SIGNATURE) == {}


def test_choices_for_another_triton_or_tile_list_are_ignored(tmp_path):
    path = tmp_path / gemv_tiles.TILES_FILE
    gemv_tiles.write_choices(path, SIGNATURE, {"4096x4096": 1})
    assert gemv_tiles.read_choices(path, {**SIGNATURE, "triton": "3.6.0"}) == {}
    assert gemv_tiles.read_choices(path, {**SIGNATURE, "tiles": ["a"]}) == {}
    assert gemv_tiles.read_choices(tmp_path / "missing.json", SIGNATURE) == {}


def test_an_unwritable_folder_costs_nothing_but_the_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    gemv_tiles.write_choices(blocker / "sub" / gemv_tiles.TILES_FILE, SIGNATURE, {"1x1": 0})  # logs, no raise


def test_the_tile_travels_through_the_op_and_cpu_layers_are_left_alone(tmp_path):
    layer = Int4Linear.from_linear(torch.nn.Linear(256, 64, bias=False))
    assert layer.tile == -1  # Triton's autotuner until a chooser says otherwise
    x = torch.randn(1, 256)
    partials, counters = layer.workspace or (torch.empty(0), torch.empty(0, dtype=torch.int32))
    named = torch.ops.smallchat.int4_linear(x, layer.qweight, layer.scales, layer.offsets, 256, partials, counters, 0)
    assert torch.equal(named, layer(x))  # the reference on the CPU, whatever the tile
    assert gemv_tiles.choose_tiles(torch.nn.Sequential(layer), tmp_path) == {}  # no CUDA layers: nothing timed
    assert layer.tile == -1 and not (tmp_path / gemv_tiles.TILES_FILE).exists()


def _model(shapes):
    torch.manual_seed(0)
    layers = [Int4Linear.from_linear(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
              for n, k in shapes]
    model = torch.nn.Sequential(*layers)
    share_workspace(model)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chosen_tiles_fit_compute_the_same_and_are_reused_from_disk(tmp_path, monkeypatch):
    from models.kernels import int4_triton

    shapes = [(1024, 1024)] * 3 + [(3000, 1000)] * 2 + [(37888, 3584)]  # an N edge, a K tail, a wide one
    model = _model(shapes)
    choices = gemv_tiles.choose_tiles(model, tmp_path)
    assert set(choices) == {"1024x1024", "3000x1000", "37888x3584"}
    for m in model:
        assert m.tile == choices[gemv_tiles.shape_key(m.out_features, m.in_features)]
        assert m.tile in gemv_tiles.candidate_tiles(m.out_features, m.qweight.device)
        x = torch.randn(1, m.in_features, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dequantize_reference(m.qweight, m.scales, m.offsets, m.in_features, torch.float32).T
        y = m(x).float()
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-2, (m.out_features, m.in_features, m.tile)
        # and bit for bit what the same tile gives when named directly
        direct = int4_triton.gemv(x, m.qweight, m.scales, m.offsets, m.in_features, m.workspace,
                                  int4_triton.tile_config(m.tile))
        assert torch.equal(direct, m(x))

    def no_timing(*args):
        raise AssertionError("a stored choice was timed again")

    monkeypatch.setattr(gemv_tiles, "time_tiles", no_timing)
    again = _model(shapes)
    assert gemv_tiles.choose_tiles(again, tmp_path) == choices
    assert [m.tile for m in again] == [m.tile for m in model]

    monkeypatch.undo()
    (tmp_path / gemv_tiles.TILES_FILE).write_text("{broken")
    assert set(gemv_tiles.choose_tiles(_model(shapes[:1]), tmp_path)) == {"1024x1024"}  # re-timed, rewritten
    assert set(json.loads((tmp_path / gemv_tiles.TILES_FILE).read_text())["choices"]) == {"1024x1024"}


def test_a_shape_run_with_a_folded_norm_epilogue_is_keyed_apart():
    from models.kernels.int4_epilogue import RESIDUAL_NORM, SCALED_SILU_MUL

    assert gemv_tiles.shape_key(4096, 4096) == "4096x4096"  # a plain GEMV: the key stored before epilogues
    assert gemv_tiles.shape_key(4096, 4096, RESIDUAL_NORM) == "4096x4096/2"
    assert gemv_tiles.shape_key(28672, 4096, SCALED_SILU_MUL) == "28672x4096/3"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiles_are_timed_with_each_layers_epilogue(tmp_path):
    from models.kernels.int4_epilogue import RESIDUAL_NORM, SCALED, SCALED_SILU_MUL

    model = _model([(2048, 2048)] * 4 + [(16384, 2048)] * 2)
    for m, epilogue in zip(model, [0, 0, RESIDUAL_NORM, SCALED, SCALED_SILU_MUL, SCALED_SILU_MUL]):
        m.epilogue = epilogue
    choices = gemv_tiles.choose_tiles(model, tmp_path)
    assert set(choices) == {"2048x2048", "2048x2048/2", "2048x2048/1", "16384x2048/3"}
    assert all(m.tile in gemv_tiles.candidate_tiles(m.out_features, m.qweight.device) for m in model)
