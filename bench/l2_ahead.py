"""A probe: the decode step's next GEMV weights asked of the L2 on a second stream, while the kernels before run.

Timed and dropped (BENCHMARKS.md, session 35; bench/results/l2_prefetch_h100_s35.txt): on an H100 every budget
and way of asking made a layer's kernel chain slower, the 1.8B's by 3-22 % and the 7B's by 0-23 %, more with
more asked. Kept, with bench/l2_prefetch.py, as the record of what was tried.

Why it was tried: what the one-token step loses to the roofline is mostly its GEMVs' fixed cost (session 34).
Each of a layer's five dependent kernels drains, launches, then waits a DRAM latency for its first weights; the
small GEMVs read at 14-24 % of the copy rate, and during the attention the DRAM is mostly idle. A 1.8B layer's
weights (31.5 MB) fit the 50 MB L2 of an H100 or H200.

How: a step's GEMVs are a fixed cycle (a layer's q/k/v, o, gate/up, down). As each starts, a second stream,
forked from the step's stream at that point (so it starts when the kernel before has ended), asks the L2 for
the weights of the GEMVs after it (scales, offsets, then words, in the order they are read), up to `budget`
bytes past the end of the one starting (`plan`). Nothing comes back to a register and nothing is written, so the
results are the same bits. On Hopper one instruction asks for 16 KB (`cp.async.bulk.prefetch.L2`, the copy
engine); on Ampere and Ada a 16-byte load fetches each 256 bytes into the L2 (`ld.global.L2::256B`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import threading

import torch

from models.kernels import nvrtc

PIECE = 1 << 20  # bytes of one asked range: the budget's granularity
# The share of the L2 a kernel's own weights and what it asks for may fill (plan); the rest is for the KV cache, the
# activations, and slack for the L2's replacement, which is not a strict LRU.
CAPACITY = 0.75

SOURCE = r"""
// Block row y asks the L2 for range y of `table`: its address, then its bytes (low 32 bits) and, in bit 62, whether
// at the L2's evict-last priority (kept past other weights streaming through before it is read). The block's
// threads stride over the range, STEP bytes a turn.
extern "C" __global__ void l2_ahead(const long long* table) {
    const char* base = (const char*)table[2 * blockIdx.y];
    long long meta = table[2 * blockIdx.y + 1];
    unsigned int bytes = (unsigned int)meta;
    bool evict_last = (meta >> 62) & 1;
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    unsigned int stride = gridDim.x * blockDim.x * STEP;
    unsigned int sink = 0;
    for (unsigned int at = (blockIdx.x * blockDim.x + threadIdx.x) * STEP; at < bytes; at += stride) {
#if BULK
        // the copy engine fetches the range into the L2 (sm_90); nothing comes back to the thread
        unsigned int size = min((unsigned int)STEP, bytes - at) & ~15u;
        if (size == 0) continue;
        if (evict_last)
            asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;"
                         :: "l"(base + at), "r"(size), "l"(policy) : "memory");
        else
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(base + at), "r"(size) : "memory");
#else
        // a 16-byte load whose miss brings its 256 bytes into the L2 (sm_80+)
        unsigned int w0, w1, w2, w3;
        if (evict_last)
            asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                         : "=r"(w0), "=r"(w1), "=r"(w2), "=r"(w3) : "l"(base + at), "l"(policy));
        else
            asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(w0), "=r"(w1), "=r"(w2), "=r"(w3) : "l"(base + at));
        sink ^= w0 ^ w1 ^ w2 ^ w3;
#endif
    }
#if !BULK
    // ptxas drops a load whose registers are never read: a store it cannot rule out (bit 63 is never set) reads them
    if (meta < 0) ((unsigned int*)table)[0] = sink;
#endif
}
"""
EVICT_LAST = 1 << 62  # the flag in a range's bytes field


def bulk_for(capability: tuple[int, int]) -> bool:
    """Whether a GPU of `capability` asks with the copy engine's bulk prefetch (sm_90) rather than loads."""
    return capability >= (9, 0)


def step_bytes(bulk: bool) -> int:
    """Bytes a thread asks for at a time: one bulk prefetch, or one load's 256-byte L2 fetch."""
    return 16384 if bulk else 256


def launch_shape(bulk: bool) -> tuple[int, int]:
    """(blocks, threads) a range is asked with. Bulk: one warp, whose 32 lanes issue its 64 prefetches; small, so
    that it finds room on an SM beside a GEMV that holds most of its registers. Loads: 4,096 threads, one load each,
    since a thread waits for its load before its next."""
    return (1, 32) if bulk else (PIECE // (128 * step_bytes(bulk)), 128)


def source_for(bulk: bool) -> str:
    """SOURCE asking with bulk prefetches or with 256-byte loads."""
    return f"#define BULK {int(bulk)}\n#define STEP {step_bytes(bulk)}\n{SOURCE}"


@functools.lru_cache(maxsize=None)
def _kernel(bulk: bool, device: torch.device) -> nvrtc.Kernel:
    return nvrtc.load_kernel(source_for(bulk), "l2_ahead", device)


def plan(sizes: list[list[int]], budget: int, capacity: int | None = None) -> list[list[tuple[int, int]]]:
    """What a cycle of kernels asks for as each starts, in a step that repeats: for kernel i, the (kernel, piece)
    indices of the pieces (sizes[k][p] bytes, in the order read) that start before the end of kernel i plus
    `budget`, counting on into the next cycle, and after kernel i's own: a kernel never asks for what it is about
    to read itself. Each piece is asked once a cycle; the budget is at most half a cycle.

    With `capacity` (bytes of the L2 to count on), a kernel asks for at most `capacity` less its own bytes: more
    would be pushed out of the L2 by its own weights streaming through before it is read. So a 7B's gate/up (59 MB)
    asks for nothing, and its down (29 MB) for 8 MB of the next q/k/v; the kernels after them ask for the rest."""
    flat = [(k, p) for k, pieces in enumerate(sizes) for p in range(len(pieces))]
    lengths = [sizes[k][p] for k, p in flat]
    total = sum(lengths)
    asks: list[list[tuple[int, int]]] = [[] for _ in sizes]
    if budget <= 0 or total == 0:
        return asks
    budget = min(budget, total // 2)
    starts = list(itertools.accumulate([0] + lengths * 3))[:-1]  # three cycles: the middle one is the steady state
    ends = list(itertools.accumulate(sum(pieces) for pieces in sizes))
    frontier = 0  # the next piece (of the three cycles) not yet asked for
    for cycle in range(2):
        for i, end in enumerate(ends):
            ahead = budget if capacity is None else min(budget, capacity - sum(sizes[i]))
            if ahead <= 0:
                continue
            end += cycle * total
            frontier = max(frontier, bisect.bisect_left(starts, end))  # not kernel i's own pieces
            while frontier < len(starts) and starts[frontier] < end + ahead:
                if cycle == 1:
                    asks[i].append(flat[frontier % len(flat)])
                frontier += 1
    return asks


def pieces_of(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The bytes of `tensors` (contiguous), in order, as flat uint8 views of at most PIECE bytes."""
    views = []
    for t in tensors:
        flat = t.contiguous().view(-1).view(torch.uint8)
        views += [flat[start:start + PIECE] for start in range(0, flat.numel(), PIECE)]
    return views


class L2Ahead:
    """A cycle of GEMVs' weights asked of the L2 ahead of them, on the side stream (the module docstring).

    Args:
        kernels: per GEMV of the cycle, in order, the tensors it reads (scales, offsets, words).
        budget: bytes asked for past the end of the GEMV starting.
        device: their CUDA device.
        evict_last: ask at the L2's evict-last priority (for the bench: what survives a large GEMV between).
        bulk: ask with bulk prefetches (True) or loads (False); by default bulk_for the device (for the bench).
        capacity: the L2's bytes to count on (plan); by default CAPACITY of the device's L2, None: no limit."""

    def __init__(self, kernels: list[list[torch.Tensor]], budget: int, device: torch.device, evict_last: bool = False,
                 bulk: bool | None = None, capacity: int | None = -1):
        pieces = [pieces_of(tensors) for tensors in kernels]
        if capacity == -1:
            capacity = int(CAPACITY * torch.cuda.get_device_properties(device).L2_cache_size)
        asks = plan([[v.numel() for v in views] for views in pieces], budget, capacity)
        rows = max((len(a) for a in asks), default=0)
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.bulk = bulk
        flag = EVICT_LAST if evict_last else 0
        # One table per GEMV, all of the same rows (unused rows ask for 0 bytes): a compiled layer's inputs then have
        # the same shapes in every layer. None for all when nothing is asked.
        self.tables = [torch.tensor([[pieces[k][p].data_ptr(), pieces[k][p].numel() | flag] for k, p in ask]
                                    + [[0, 0]] * (rows - len(ask)), dtype=torch.int64, device=device).view(-1, 2)
                       if rows else None for ask in asks]
        self.asked_bytes = sum(pieces[k][p].numel() for ask in asks for k, p in ask)
        # the weights must stay where the tables point: keep what they were read from
        self._kernels = kernels

    def ask(self, index: int) -> None:
        """Fork the second stream here and ask the L2 for what GEMV `index` of the cycle asks for as it starts."""
        if self.tables[index] is not None:
            ask_on(self.tables[index], self.bulk)

    def join(self) -> None:
        """The step's stream waits for this thread's side stream (a CUDA graph's capture must end with both joined)."""
        torch.cuda.current_stream(self.device).wait_stream(side_stream(self.device))


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the L2 is asked on, one for each GPU and thread. The ops find it from their table's device, so no
    stream handle is baked into a compiled graph (a second load of the same shape reuses the compiled layer). One a
    thread: a thread capturing a CUDA graph (a load's warm-up) must not share it with a thread running a step eagerly
    (another model's background compile); a capture would take in the other thread's launches."""
    return _side_stream(device, threading.get_ident())


@functools.lru_cache(maxsize=64)
def _side_stream(device: torch.device, thread: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def ask_on(table: torch.Tensor, bulk: bool | None = None) -> None:
    """Fork the side stream from the current one here, and ask the L2 for `table`'s ranges on it (what a decode GEMV
    would do first), with bulk prefetches or loads (bulk_for by default)."""
    device = nvrtc.device_of(table)
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    bulk = bulk_for(torch.cuda.get_device_capability(device)) if bulk is None else bulk
    with torch.cuda.stream(side):
        blocks, threads = launch_shape(bulk)
        _kernel(bulk, device)((blocks, table.shape[0], 1), (threads, 1, 1), [table])
