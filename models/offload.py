"""Offloaded decoder layers streamed onto the GPU ahead of use: page-locked host copies, a copy
stream, and two staging slots on the device.

Why not accelerate's offload (what `device_map` gives): its hook copies a layer's weights from
pageable RAM when the layer is called, and the GPU waits for every copy. A 7B fp16 model under
8 GiB decoded at 0.68 tok/s that way on an H100 (shared FACTS), a fraction of what the bus
carries. Here:
- each offloaded layer's tensors are packed into one flat host buffer, page-locked with
  cudaHostRegister, so copies run as DMA at the bus rate (torch's pinned allocator would round
  every buffer up to a power of two: +23 % RAM for a 7B layer);
- the device holds two staging slots; while layer j computes from one, layer j+1 is copied into
  the other on a side stream, so the bus never waits for the GPU or the GPU for a request;
- each layer's parameters are fixed views into its slot (the j-th offloaded layer uses slot
  j % 2), so nothing is re-bound per call: at run time there are only the copies and two event
  waits per layer.
- a layer's slot is refilled for its next user as soon as the layer has run (gated on the GPU), so
  at the end of a pass the next pass's first two layers copy while the token is sampled;
- the streamed layers come first in the model (memory.FitPlan.layer_device) and accelerate's hooks
  go once every weight is on the GPU, so the host comes back to the streamed layers sooner after
  a token. (An H200 trace of the copies: the bus's only idle time is one gap per token, before the
  next pass's copies; 35-58 ms with the earlier schedule, 33-43 now: BENCHMARKS.md, session 23.)
A token then costs about (offloaded bytes / host-to-device bandwidth). On a CPU-only machine the
same class runs with plain copies and no streams (used by the tests for the bookkeeping).

Layout per layer: host[j] = uint8[nbytes_j], tensors at offsets aligned to ALIGN bytes;
slot[s] = uint8[max_j nbytes_j] on the device.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch

ALIGN = 256  # byte alignment of each tensor inside a flat buffer (vector loads, DMA)
SLOTS = 2  # staging slots on the device: one computing, one being filled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorSpec:
    """Where one tensor of a layer lives inside the layer's flat buffer."""

    module: str  # submodule path inside the layer ("" = the layer itself)
    name: str  # attribute name on that submodule
    is_param: bool
    offset: int  # bytes from the start of the buffer
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes."""
        return self.shape.numel() * torch.empty(0, dtype=self.dtype).element_size()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _weights_map(module: torch.nn.Module):
    """The offloaded weights accelerate keeps for a hooked module (None if it holds none)."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", [])]:
        if getattr(h, "weights_map", None) is not None:
            return h.weights_map
    return None


def _layer_tensors(layer: torch.nn.Module) -> list[tuple[str, str, bool, torch.Tensor, object]]:
    """(submodule, name, is_param, real tensor, weights map) for every parameter and buffer of a layer.

    Tensors that accelerate offloaded sit on the meta device; their values come from the weights
    map of the hook on the submodule that owns them (accelerate hooks each leaf module), as
    accelerate's own pre-forward reads them. The map is returned so its copy can be dropped.
    """
    out = []
    for path, sub in layer.named_modules():
        weights = _weights_map(sub)
        for is_param, items in ((True, sub._parameters.items()), (False, sub._buffers.items())):
            for name, tensor in items:
                if tensor is None:
                    continue
                if tensor.device.type == "meta":
                    if weights is None:
                        full = f"{path}.{name}" if path else name
                        raise ValueError(f"{full} is on the meta device and no offloaded copy was found")
                    out.append((path, name, is_param, weights[name], weights))
                else:
                    out.append((path, name, is_param, tensor, None))
    return out


def _forget_offloaded_copy(weights, name: str) -> None:
    """Drop accelerate's RAM copy of a tensor once ours exists, so RAM holds one copy, not two."""
    store = getattr(getattr(weights, "dataset", None), "state_dict", None)
    prefix = getattr(weights, "prefix", None)
    if isinstance(store, dict) and isinstance(prefix, str):
        store.pop(prefix + name, None)


def _page_lock(buffer: torch.Tensor) -> bool:
    """Register a host buffer with CUDA (exact size) so copies from it are asynchronous DMA."""
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    code = int(getattr(err, "value", err))
    if code != 0:
        # Still correct without it, only slower (pageable copies are staged by the driver).
        log.warning("cudaHostRegister failed (error %s); offloaded layers stream from pageable RAM", code)
        return False
    return True


def _release(buffers: list[torch.Tensor], locked: list[bool], stream) -> None:
    """Finalizer: wait for copies in flight, then unregister the host buffers before they are freed."""
    if stream is not None:
        stream.synchronize()
    for buffer, is_locked in zip(buffers, locked):
        if is_locked:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    buffers.clear()


class LayerStreamer:
    """Keeps `layers` in host RAM and streams each onto `device` one layer ahead of its use.

    Args:
        layers: the offloaded decoder layers, in the order the model calls them. Their tensors
            may be real (CPU) or meta with an accelerate offload hook; hooks are removed.
        device: where the layers compute (the model's GPU; "cpu" in tests).
    """

    def __init__(self, layers: list[torch.nn.Module], device: torch.device | str):
        if not layers:
            raise ValueError("LayerStreamer needs at least one layer")
        from accelerate.hooks import remove_hook_from_module

        self.device = torch.device(device)
        self.layers = list(layers)
        on_cuda = self.device.type == "cuda"
        self.specs: list[list[_TensorSpec]] = []
        self.host: list[torch.Tensor] = []
        for j, layer in enumerate(self.layers):
            tensors = _layer_tensors(layer)
            specs, offset = [], 0
            for path, name, is_param, t, _ in tensors:
                specs.append(_TensorSpec(path, name, is_param, offset, t.dtype, t.shape))
                offset = _round_up(offset + t.numel() * t.element_size(), ALIGN)
            flat = torch.empty(offset, dtype=torch.uint8)
            for spec, (_, _, _, t, _) in zip(specs, tensors):
                self._view(flat, spec).copy_(t)
            # Detaching puts accelerate's copies back on the layer: drop them there (by binding
            # views into our packed copy for now) and in the weights maps, so RAM holds each
            # layer once. The views into the device slots are bound once the slots exist.
            remove_hook_from_module(layer, recurse=True)
            for _, name, _, _, weights in tensors:
                if weights is not None:
                    _forget_offloaded_copy(weights, name)
            del tensors
            self.specs.append(specs)
            self.host.append(flat)
            self._bind(j, flat)
        locked = [_page_lock(b) for b in self.host] if on_cuda else [False] * len(self.host)
        self.page_locked = all(locked)
        n_slots = min(SLOTS, len(self.layers))
        self.slot_bytes = max(b.numel() for b in self.host)
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        for slot in self.slots:
            if self.copy_stream is not None:
                # The copy stream writes the slots: the allocator must not hand their memory
                # out again (after unload) before those writes are done.
                slot.record_stream(self.copy_stream)
        self.ready = [torch.cuda.Event() for _ in self.slots] if on_cuda else [None] * n_slots  # copy done
        self.free = [torch.cuda.Event() for _ in self.slots] if on_cuda else [None] * n_slots  # compute so far
        self.filled_with = [-1] * n_slots  # index of the layer whose copy was last issued into each slot
        self.copies = 0  # layer copies issued so far (tests, bench)
        self.trace: list | None = None  # (bytes, start event, end event, host s) per copy while tracing (bench)
        self.prefetch_after_use = True  # False: copy a layer only once the host reaches the layer before (bench)
        # The layer that reads layer j's slot next, in call order (wrapping into the next pass): fixed, so
        # worked out once here rather than in every layer's hook of every token.
        n = len(self.layers)
        self.next_user = [next(i % n for i in range(j + 1, j + n + 1) if self.slot_of(i % n) == self.slot_of(j))
                          for j in range(n)]
        for j, layer in enumerate(self.layers):
            self._bind(j, self.slots[self.slot_of(j)])
            layer.register_forward_pre_hook(self._make_pre_hook(j))
            layer.register_forward_hook(self._make_post_hook(j))
        self._finalizer = weakref.finalize(self, _release, self.host, locked, self.copy_stream)

    # ----- layout ------------------------------------------------------------------------
    @staticmethod
    def _view(buffer: torch.Tensor, spec: _TensorSpec) -> torch.Tensor:
        return buffer[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)

    def slot_of(self, j: int) -> int:
        """The staging slot the j-th offloaded layer computes from."""
        return j % len(self.slots)

    def _bind(self, j: int, buffer: torch.Tensor) -> None:
        """Make layer j's parameters and buffers views into `buffer` (its slot, once there is one)."""
        for spec in self.specs[j]:
            sub = self.layers[j].get_submodule(spec.module) if spec.module else self.layers[j]
            view = self._view(buffer, spec)
            if spec.is_param:
                sub._parameters[spec.name] = torch.nn.Parameter(view, requires_grad=False)
            else:
                sub._buffers[spec.name] = view

    @property
    def host_bytes(self) -> int:
        """RAM held by the offloaded layers."""
        return sum(b.numel() for b in self.host)

    @property
    def device_bytes(self) -> int:
        """Device memory of the staging slots."""
        return self.slot_bytes * len(self.slots)

    def copy_rate(self, reps: int = 3) -> float:
        """GB/s of copying every offloaded layer into a staging slot on the copy stream, as decode does (bench).

        Between forwards only: the slots' contents are forgotten, so the next forward refills them.
        """
        if self.copy_stream is None:
            raise RuntimeError("the copy rate is a CUDA measurement")
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            start.record()
            for _ in range(reps):
                for host in self.host:
                    self.slots[0][:host.numel()].copy_(host, non_blocking=True)
            end.record()
        end.synchronize()
        self.filled_with = [-1] * len(self.slots)
        return reps * self.host_bytes / (start.elapsed_time(end) / 1e3) / 1e9

    def start_trace(self) -> None:
        """Time every layer copy from now on (bench: is the bus busy, and at what rate?)."""
        self.trace = []

    def stop_trace(self) -> dict:
        """Stop timing copies; what the traced copies did: rate while copying, and the bus's busy share.

        busy_fraction is the copies' summed time over the span from the first copy's start to the
        last one's end: below 1, the schedule left the bus idle; a low rate while copying points at
        the buffers or the link instead.
        """
        trace, self.trace = self.trace or [], None
        if not trace:
            return {"copies": 0}
        trace[-1][2].synchronize()
        busy_ms = sum(t[1].elapsed_time(t[2]) for t in trace)
        span_ms = trace[0][1].elapsed_time(trace[-1][2])
        nbytes = sum(t[0] for t in trace)
        # Per copy: the bus idle before it (ms) and when the host issued it (ms after the first).
        gaps = [round(a[2].elapsed_time(b[1]), 3) for a, b in zip(trace, trace[1:])]
        return {"copies": len(trace), "gb": nbytes / 1e9, "gbps_while_copying": nbytes / (busy_ms / 1e3) / 1e9,
                "busy_fraction": busy_ms / span_ms, "span_s": span_ms / 1e3, "idle_ms_before": gaps,
                "issued_ms": [round(1e3 * (t[3] - trace[0][3]), 3) for t in trace[1:]],
                "host_ms_in_copy_call_max": 1e3 * max(t[4] for t in trace)}

    # ----- run time ----------------------------------------------------------------------
    def _fill(self, j: int) -> None:
        """Issue the copy of layer j into its slot, to start once the slot's previous user is done.

        Called from the hooks, so "done" is everything the compute stream holds so far: the
        slot's last reader (the layer before, or this layer after its forward) is in there.
        """
        s = self.slot_of(j)
        if self.filled_with[s] == j:
            return
        self.filled_with[s] = j
        self.copies += 1
        src, dst = self.host[j], self.slots[s][:self.host[j].numel()]
        if self.copy_stream is None:
            dst.copy_(src)
            return
        self.free[s].record(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_event(self.free[s])
        with torch.cuda.stream(self.copy_stream):
            if self.trace is not None:
                timed = [src.numel(), torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                         time.perf_counter()]
                self.trace.append(timed)
                timed[1].record()
            dst.copy_(src, non_blocking=True)
            if self.trace is not None:
                timed[2].record()
                timed.append(time.perf_counter() - timed[3])  # host time inside the copy call
        self.ready[s].record(self.copy_stream)

    def _next(self, j: int) -> int:
        return (j + 1) % len(self.layers)  # after the last offloaded layer: the first, for the next pass

    def _make_pre_hook(self, j: int):
        def pre_hook(module, args):
            s = self.slot_of(j)
            self._fill(j)  # a no-op when it was prefetched
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            nxt = self._next(j)
            if self.slot_of(nxt) != s:  # its slot is not the one this layer reads: fill it now
                self._fill(nxt)
        return pre_hook

    def _make_post_hook(self, j: int):
        def post_hook(module, args, output):
            # Layer j's slot is free once its compute (queued just now) is done: queue the copy of
            # its next user now, gated on the GPU, not on when the CPU reaches that layer. At the
            # end of a pass this copies the next pass's first layers while the token is sampled
            # and the GPU-resident layers run, instead of after the host has come back to them.
            if self.prefetch_after_use:
                self._fill(self.next_user[j])
            elif self.slot_of(self._next(j)) == self.slot_of(j):  # one slot, or an odd count wrapping around
                self._fill(self._next(j))
        return post_hook


def drop_alignment_hooks(model: torch.nn.Module, device: torch.device | str) -> bool:
    """Remove accelerate's hooks from `model` if every weight is now on `device`'s type; whether it did.

    Once the streamer owns the offloaded layers, the hooks left on the other modules only move
    inputs that are already on the device, ~40 us of host time each per call (a CPU timing;
    120-odd calls per token for a 7B with 10 resident layers).
    """
    from accelerate.hooks import remove_hook_from_module

    kind = torch.device(device).type
    if any(t.device.type != kind for t in [*model.parameters(), *model.buffers()]):
        return False  # something still lives in RAM or on disk (e.g. an lm_head that did not fit): keep them
    remove_hook_from_module(model, recurse=True)
    return True


def stream_offloaded_layers(model: torch.nn.Module, layer_names: list[str], device: torch.device | str) -> LayerStreamer:
    """Replace accelerate's offload of the named decoder layers with a LayerStreamer onto `device`."""
    return LayerStreamer([model.get_submodule(name) for name in layer_names], device)
