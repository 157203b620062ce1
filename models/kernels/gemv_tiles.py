"""Each int4 GEMV shape's tile, chosen the way decode runs it, and remembered on disk.

Every candidate tile (int4_triton._GEMV_CONFIGS, those whose split fits the shape) runs the model's
own layers of that shape back to back in one CUDA graph, as a decode step does (with the epilogue the
step runs them with: Int4Linear.epilogue, int4_epilogue.py), and the fastest per call is kept on each
layer (Int4Linear.tile), which the GEMV then launches directly.

Why not Triton's autotuner (int4_triton._gemv_kernel): it times one launch at a time, each after
clearing L2, which is not the regime of a decode step, where a graph runs the GEMVs back to back and
the launch and the split-K tail of one overlap nothing but the next. On the H200 it picked, for
Qwen2.5-7B's q/k/v, a tile that takes 15.0 us a call in a graph against 7.87 for the best of the same
five, and for the 7B's o projection one 11 % slower than the best (bench/results/int4_gemv_half2_h200_s26.txt,
int4_kernels_h200_s26.txt). Timing in a graph is also cheaper: a few replays instead of 12 ms of
launches per tile and shape.

The choices are kept in the app's compile-cache folder (one per torch build and GPU), keyed by the
Triton version, the tile list and the launch level (models/kernels/pdl.py): a later load of the same
shapes picks the same tiles without timing, so the compiled step, whose graph holds the tile numbers,
is found in the compile cache again. A missing, corrupt or mismatched file is ignored and rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .int4 import Int4Linear, share_workspace
from .split_k import split_fits

log = logging.getLogger(__name__)

TILES_FILE = "gemv_tiles.json"
REPLAYS = 5  # timed replays of each tile's graph (after one untimed)
# A tile of the tensor-core GEMV (int4_mma.py) is taken only when it beats Triton's best by this much: timed
# alone, its cluster tile won the 1.8B's lm_head by a hair, and the decode step then ran 0.5-1.1 % slower
# (H100, session 33); where it wins clearly (the deep down projections, 14-22 % a call) it is still taken.
MMA_MARGIN = 0.03


def _signature(device: torch.device) -> dict:
    """What the stored choices are only valid for: this Triton, this list of tiles, and how the GEMVs are
    launched on `device` (pdl.py: an early launch overlaps the GEMVs timed back to back)."""
    from . import int4_mma, int4_triton, pdl

    return {"triton": int4_triton.triton.__version__, "tiles": [str(c) for c in int4_triton._GEMV_CONFIGS],
            "mma_tiles": [list(t) for t in int4_mma.TILES] if int4_mma.offered(device) else [],
            "pdl": pdl.level(device)}


def shape_key(out_features: int, in_features: int, epilogue: int = 0) -> str:
    """The stored choices' key of a GEMV shape: 'NxK', and '/e' for a GEMV run with epilogue e (not 0: a plain store)."""
    return f"{out_features}x{in_features}" + (f"/{epilogue}" if epilogue else "")


def read_choices(path: Path, signature: dict) -> dict[str, int]:
    """The tiles stored at `path` under `signature`; {} if the file is missing, unreadable or for another signature."""
    try:
        stored = json.loads(Path(path).read_text())
        if stored.get("signature") != signature:
            return {}
        return {key: int(tile) for key, tile in stored["choices"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_choices(path: Path, signature: dict, choices: dict[str, int]) -> None:
    """Store `choices` under `signature` at `path` (written whole, then renamed: never half a file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"signature": signature, "choices": choices}, indent=1))
        partial.replace(path)
    except OSError as error:  # a read-only or full cache folder costs the next load a re-timing, nothing more
        log.warning("could not store the GEMV tile choices in %s: %s", path, error)


def candidate_tiles(out_features: int, device: torch.device | None = None) -> list[int]:
    """Indices (int4_triton.tile_config) of the tiles that run a GEMV of this many outputs: those of
    int4_triton._GEMV_CONFIGS whose split-K partial sums fit the workspace, then, on a `device` that has
    them, the tensor-core GEMV's (int4_mma.tile_fits)."""
    from . import int4_mma, int4_triton

    triton_tiles = [i for i, c in enumerate(int4_triton._GEMV_CONFIGS) if split_fits(c.kwargs["SPLIT"], out_features)]
    if device is None:
        return triton_tiles
    first = len(int4_triton._GEMV_CONFIGS)
    return triton_tiles + [first + i for i, tile in enumerate(int4_mma.TILES)
                           if int4_mma.tile_fits(tile, out_features, device)]


def fastest(timings: dict[int, float]) -> int:
    """The tile of least µs per call, a tensor-core one (int4_triton.tile_config's indices past Triton's) only if
    it beats Triton's fastest by MMA_MARGIN."""
    from . import int4_triton

    first_mma = len(int4_triton._GEMV_CONFIGS)
    best_triton = min((t for t in timings if t < first_mma), key=timings.get, default=None)
    best = min(timings, key=timings.get)
    if best_triton is not None and best >= first_mma and timings[best] > (1 - MMA_MARGIN) * timings[best_triton]:
        return best_triton
    return best


def time_tiles(layers: list[Int4Linear], tiles: list[int], dtype: torch.dtype = torch.bfloat16) -> dict[int, float]:
    """Microseconds per GEMV of each tile, over `layers` (one shape and epilogue) back to back in a CUDA graph, for
    activations of `dtype` (the kernels precompile compiled for the model)."""
    from . import int4_triton
    from .int4_folded import epilogue_call

    first = layers[0]
    x = torch.randn(1, first.in_features, dtype=dtype, device=first.qweight.device)
    timings = {}
    for tile in tiles:
        config = int4_triton.tile_config(tile)
        if "MMA" in config:
            try:  # compiled at run time (NVRTC): where that fails, the shape keeps Triton's tiles
                epilogue_call(first, x, config)()
            except Exception as error:  # noqa: BLE001 (any failure of an optional kernel: log it, go on without)
                log.warning("the tensor-core GEMV tile %s cannot run here, left out: %s", config["MMA"], error)
                continue
        calls = [epilogue_call(m, x, config) for m in layers]

        def run(calls=calls):
            for call in calls:
                call()

        side = torch.cuda.Stream()  # the first run (a compile, if precompile missed it) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        timings[tile] = start.elapsed_time(end) * 1e3 / (REPLAYS * len(layers))
        del graph
    return timings


def choose_tiles(model: torch.nn.Module, folder: Path | None) -> dict[str, int]:
    """Set `tile` on every Int4Linear of `model` (on CUDA) to its shape's fastest; the choices by shape.

    Shapes stored in `folder` (TILES_FILE) are taken from there; the others are timed (time_tiles)
    and stored. Nothing happens without CUDA or Triton (the layers keep tile -1: the reference or
    Triton's autotuner runs them).
    """
    from . import int4_triton

    layers = [m for m in model.modules() if isinstance(m, Int4Linear) and m.qweight.is_cuda]
    if not layers or not int4_triton.available():
        return {}
    if any(m.workspace is None for m in layers):
        share_workspace(model)
    by_shape: dict[str, list[Int4Linear]] = {}
    for m in layers:
        by_shape.setdefault(shape_key(m.out_features, m.in_features, m.epilogue), []).append(m)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embeddings.weight.dtype if embeddings is not None else torch.bfloat16  # the activations' dtype
    signature = _signature(layers[0].qweight.device)
    path = Path(folder) / TILES_FILE if folder is not None else None
    stored = read_choices(path, signature) if path is not None else {}
    choices, timed = {}, False
    for key, group in by_shape.items():
        tile = stored.get(key)
        candidates = candidate_tiles(group[0].out_features, group[0].qweight.device)
        if tile not in candidates:
            started = time.perf_counter()
            timings = time_tiles(group, candidates, dtype)
            tile = fastest(timings)
            timed = True
            log.info("GEMV %s: tile %d of %s (us per call: %s) in %.2f s", key, tile, sorted(timings),
                     {t: round(us, 2) for t, us in timings.items()}, time.perf_counter() - started)
        choices[key] = tile
        for m in group:
            m.tile = tile
    if timed and path is not None:
        write_choices(path, signature, {**stored, **choices})
    return choices
