"""Host-to-device copy rate by how the host buffer was made and how the copy is issued (a CUDA probe).

Why: the streamed fp16 offload (models/offload.py) decoded the 7B at 73 % of the bus roofline, and
that roofline is measured from torch's pinned buffer (cudaHostAlloc). The streamer's buffers are
malloc'd and then cudaHostRegister'ed: if those copy slower, the buffers, not the schedule, are
the limit. Rows (one layer's bytes each, copied into one device buffer, timed with events):
- pinned: torch.empty(pin_memory=True) (cudaHostAlloc through torch's caching host allocator);
- registered: torch.empty() (malloc), then cudaHostRegister, as the streamer does today;
- registered-hugepages: an anonymous mmap advised MADV_HUGEPAGE (transparent 2 MiB pages), then
  cudaHostRegister: fewer pages for the DMA engine and the IOMMU to walk;
and for each, the copy as one call, as 4 chunks on one stream, and alternating over two streams.

    python bench/h2d_probe.py [--mib 416] [--reps 10] [--out h2d.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20


def _thp_mode() -> str:
    """The kernel's transparent huge page setting (e.g. 'always [madvise] never')."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def _registered(t: torch.Tensor) -> torch.Tensor:
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return t


def host_buffer(kind: str, nbytes: int):
    """(tensor, keep-alive object) of `nbytes` host bytes made the `kind` way, filled."""
    if kind == "pinned":
        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        keep = None
    elif kind == "registered":
        t = torch.empty(nbytes, dtype=torch.uint8)
        keep = None
    elif kind == "registered-hugepages":
        keep = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        keep.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(keep, dtype=torch.uint8)
    else:
        raise ValueError(kind)
    t.fill_(1)  # touch every page before registering, as the streamer's copy_ does
    if kind != "pinned":
        _registered(t)
    return t, keep


def time_copies(src: torch.Tensor, dst: torch.Tensor, how: str, reps: int) -> float:
    """GB/s of `reps` copies of src into dst issued the `how` way."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    chunks = 4

    def one():
        if how == "one call":
            dst.copy_(src, non_blocking=True)
        elif how == "4 chunks":
            for s, d in zip(src.chunk(chunks), dst.chunk(chunks)):
                d.copy_(s, non_blocking=True)
        else:  # two streams: chunks alternate between them
            main = torch.cuda.current_stream()
            for i, (s, d) in enumerate(zip(src.chunk(chunks), dst.chunk(chunks))):
                stream = streams[i % 2]
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    d.copy_(s, non_blocking=True)
            for stream in streams:
                main.wait_stream(stream)

    from bench.int4_kernels import timed_ms

    return src.numel() / (timed_ms(one, reps) / 1e3) / 1e9


def main() -> None:
    """Command-line entry point: print the table (and write JSON with --out)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=416, help="bytes per copy (default: one fp16 7B layer)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("a CUDA probe: no GPU here")
    nbytes = args.mib * MiB
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows = []
    for kind in ("pinned", "registered", "registered-hugepages"):
        src, keep = host_buffer(kind, nbytes)
        for how in ("one call", "4 chunks", "2 streams"):
            rows.append({"buffer": kind, "copy": how, "gbps": time_copies(src, dst, how, args.reps)})
        if kind != "pinned":
            torch.cuda.cudart().cudaHostUnregister(src.data_ptr())
        del src, keep
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "mib": args.mib, "thp": _thp_mode()}
    print(f"GPU: {meta['gpu']} (torch {meta['torch']}); {args.mib} MiB per copy; transparent huge pages: {meta['thp']}")
    print("\n| host buffer | copy | GB/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['buffer']} | {r['copy']} | {r['gbps']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
