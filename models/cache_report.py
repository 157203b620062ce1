"""What the app keeps in its cache folder, part by part, and the disk each part takes.

All of it but the browser-state key can be rebuilt: deleting a part costs time at the next load that
needs it (an unpack, a conversion, a compile, an int4 quantization), not data. The report says which
folder is which, so a user short of disk space knows what deleting each one costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# (sub-folder, what it holds, what deleting it costs)
PARTS = (
    ("unpacked", "GGUF models (the embedded one too) unpacked to safetensors", "unpacked again at their next load"),
    ("converted", "InternLM2 checkpoints converted to the Llama layout", "converted again at their next load"),
    ("int4", "int4 weights stored at a model's first 4bit-fast load (the most recently used few are kept)",
     "the next 4bit-fast load reads the full-precision weights and quantizes them again"),
    ("compile", "compiled decode steps, int4 kernels and the GEMV tile chosen per shape, per torch build and GPU",
     "the next 4bit-fast load of each shape compiles and times its tiles again"),
    ("offload", "decoder layers offloaded to disk by a load that did not fit in RAM", "nothing once unloaded"),
    ("logs", "tracebacks of internal errors", "nothing"),
    ("browser-state.key", "the key the chats saved in browsers are encrypted with",
     "the chats saved in browsers can no longer be restored"),
)


@dataclass(frozen=True)
class CachePart:
    """One part of the cache folder and the bytes it takes."""

    folder: Path
    holds: str
    deleting_costs: str
    bytes: int


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, or of the file `folder` (0 if it does not exist)."""
    if folder.is_file():
        return folder.stat().st_size
    if not folder.exists():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def cache_report(cache_dir: Path) -> list[CachePart]:
    """The cache folder's parts, each with its size; what lies outside them as a last part, "other"."""
    cache_dir = Path(cache_dir)
    parts = [CachePart(cache_dir / name, holds, costs, folder_bytes(cache_dir / name)) for name, holds, costs in PARTS]
    known = {name for name, _, _ in PARTS}
    other = sum(folder_bytes(p) for p in (cache_dir.iterdir() if cache_dir.is_dir() else []) if p.name not in known)
    return parts + [CachePart(cache_dir, "files the app did not put there", "not known to the app", other)]


def format_cache_report(cache_dir: Path) -> str:
    """The report as text: one line per part, then the total."""
    parts = cache_report(cache_dir)
    lines = [f"cache folder {Path(cache_dir)}:"]
    for part in parts:
        name = part.folder.name if part.folder != Path(cache_dir) else "other"
        lines.append(f"  {name:<17} {_size(part.bytes):>9}  {part.holds}; deleting it: {part.deleting_costs}")
    lines.append(f"  {'total':<17} {_size(sum(p.bytes for p in parts)):>9}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
