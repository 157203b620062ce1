"""Programmatic dependent launch (Hopper and later) for the decode step's kernels: whether, and how.

Why: with the norms folded into the GEMVs (int4_epilogue.py), a layer of the one-token step is five
of our own kernels back to back (q/k/v GEMV, decode attention, o, gate/up, down), 160 boundaries in a
7B step. At each one the GPU drains the kernel before (its split-K tail: a few programs, the DRAM
idle), launches the next, and the next waits a DRAM latency for its first weights. A 128 x 128 GEMV
alone took 3.77 us in a graph on the H200, against 0.67 for an empty kernel (BENCHMARKS.md, session
20); the step's small GEMVs ran at 2.5-3x their copy time (session 26). With programmatic dependent
launch a kernel is started while the one before it still runs, once all of that kernel's programs
have said so (griddepcontrol.launch_dependents: ours say it as they start), and it waits
(griddepcontrol.wait) only before it reads anything an earlier kernel wrote. What it may do before
that wait is what does not depend on the step: its weights (and, for the attention, the cache's
earlier positions) are constant during decode.

Levels (SMALLCHAT_PDL; 0 unless set: on the H200 both others were slower, the 7B's step 2.40 ms at 0
against 2.60 at level 2, the 1.8B's 1.107 / 1.143 / 1.162 ms at 0 / 1 / 2; BENCHMARKS.md, session 28):
- 0: plain launches.
- 1 (EARLY): launched early; the prefetching GEMV tiles load their first group of weights into
  registers before the wait.
- 2 (EARLY_PREFETCH): also, every program asks the L2 for its first weights (GEMV: up to
  PREFETCH_GROUPS groups of its share, with their scales and offsets; attention: its chunk of keys and
  values) before the wait: no registers are held, and the DRAM, idle in the kernel before's tail,
  starts on them.

Session 20 tried level 1 without the early signal (the kernel before each GEMV was an Inductor
norm, cuBLAS attention or the SiLU, none of which signals): 0.5-1.4 % on the GEMVs, nothing end to
end, reverted. What changed: every kernel of the layer is ours now, and each signals as it starts.

Safety: a kernel waits before it reads what an earlier kernel wrote and before it writes anything
(the split-K workspace and counters are shared by every GEMV of a model), and every program waits
unconditionally, so a kernel's end still implies the end of all before it. Plain kernels around them
(Inductor's, torch's) keep stream order. Only compute capability 9.0+ has the instructions; Ampere
and Ada (most 8 GB cards) and Triton's interpreter run level 0.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch does not bring Triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: level() says 0, the kernels launch plainly
    gdc_launch_dependents = gdc_wait = None

log = logging.getLogger(__name__)

ENV = "SMALLCHAT_PDL"
OFF, EARLY, EARLY_PREFETCH = 0, 1, 2


def requested() -> int:
    """The level SMALLCHAT_PDL asks for (0, 1 or 2; anything else is 0, logged once)."""
    return _parse(os.environ.get(ENV, "0"))


@functools.cache  # read at every launch: a bad value is logged once, not at every kernel
def _parse(value: str) -> int:
    value = value.strip() or "0"
    if value in ("0", "1", "2"):
        return int(value)
    log.warning("%s=%r is not 0, 1 or 2: launching without programmatic dependent launch", ENV, value)
    return OFF


def level(device: torch.device) -> int:
    """The level the kernels launched on `device` run at: requested() where the GPU and Triton have it, else 0."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return OFF
    wanted = requested()
    return wanted if wanted and _has_dependent_launch(device.index) else OFF


@functools.cache
def _has_dependent_launch(device_index: int | None) -> bool:
    """Compute capability 9.0 or later (Hopper, Blackwell): griddepcontrol exists."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(pdl_level: int) -> dict:
    """A kernel launch's arguments for `pdl_level`: the kernel's PDL constexpr and Triton's launch_pdl option."""
    return {"PDL": pdl_level, "launch_pdl": pdl_level > OFF}


if triton is not None:
    # Weight groups of its share a GEMV program asks the L2 for before its wait (a constexpr: read in kernels).
    PREFETCH_GROUPS = tl.constexpr(4)

    @triton.jit
    def start_early(PDL: tl.constexpr):
        """Let the next kernel launch now (every program of this one calls this first)."""
        if PDL > 0:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_earlier(PDL: tl.constexpr):
        """Wait until the kernels before this one have finished and their writes are visible."""
        if PDL > 0:
            gdc_wait()

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask the L2 for the lines at `ptrs`, which must lie inside their tensor (one pointer per 128-byte
        line is enough): no register receives them and nothing waits for them; a later load finds them there."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
