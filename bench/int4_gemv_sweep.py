"""GEMV tile sweep on the GPU: every (BLOCK_N, SPLIT, warps, PREFETCH, LOOP_STAGES) over 7B/1.8B linear shapes,
weights rotated through > L2 so each call reads DRAM; ms per call and fraction of the copy rate.

    python bench/int4_gemv_sweep.py BUDGET_S OUT.json [fused|app|7b] [half2 [stages]]

half2: the packed-fp16 loop's tiles (HALF2, 4, 8 and 16 rows a thread) against the app's five tuned tiles,
in the same run; stages: those tiles with 3-4 pipeline stages (cp.async) as well. (A row's last field is
the L2 look-ahead that session 29 timed and removed from the kernel: always 0 now, kept so that rows and
bench/pick_tiles.py read the old results alike.)"""
import json, math, sys, time
import torch
sys.path.insert(0, ".")
from models.kernels import int4, int4_triton as kt
from bench.decode_speed import copy_bandwidth

dev = torch.device("cuda")
rate = copy_bandwidth(nbytes=1 << 30, reps=10)
print(f"# {torch.cuda.get_device_name()} copy {rate:.0f} GB/s", flush=True)
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (2048, 2048), (8192, 2048), (2048, 8192)]
# The fused q/k/v and gate/up layers the app now loads (models/fused_projections.py): 7B, 1.8B, Qwen2.5-7B.
FUSED = [(6144, 4096), (28672, 4096), (4096, 2048), (16384, 2048), (4608, 3584), (37888, 3584)]
# Every linear of one decode step as the app loads them (fused q/k/v and gate/up, then o and down):
# 7B, 1.8B, then Qwen2.5-7B (its K = 3584 compiles the tiles again, so it comes last).
APP = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 2048), (2048, 2048), (16384, 2048),
       (2048, 8192), (4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]
if len(sys.argv) > 3:
    SHAPES = {"fused": FUSED, "app": APP, "7b": APP[:4]}[sys.argv[3]]
BUDGET_S = float(sys.argv[1]) if len(sys.argv) > 1 else 400
t0 = time.time()
# Tiles of 64-1024 rows over 1-4 warps (a thread holds 1-8 rows' worth of a group's words), each
# (PREFETCH) loading one group ahead into registers, or (no PREFETCH) not, or with LOOP_STAGES 3-4
# copying the next groups into shared memory asynchronously (Triton's pipeliner, cp.async): bytes in
# flight without registers, which lets a program take a longer share of K (SPLIT down to 2) and
# leaves less split-K reduction. BLOCK_N 32 and SPLIT 1 were never near the best (sessions 17-20).
TILES = [(bn, w) for bn in (64, 128, 256, 512, 1024) for w in (1, 2, 4) if 1 <= bn // (32 * w) <= 8]
grid = ([(bn, sp, w, 1, True) for bn, w in TILES for sp in (8, 16, 32, 64)]
        + [(bn, sp, w, 1, False) for bn, w in TILES for sp in (8, 16, 32)]
        + [(bn, sp, w, st, False) for bn, w in TILES for sp in (2, 4, 8, 16) for st in (3, 4)])
if "half2" in sys.argv[4:]:
    grid = ([(c.kwargs["BLOCK_N"], c.kwargs["SPLIT"], c.num_warps, c.kwargs.get("LOOP_STAGES", 1),
              c.kwargs.get("PREFETCH", True), c.kwargs.get("HALF2", False)) for c in kt._GEMV_CONFIGS]
            + [(bn, sp, w, 1, False, True) for bn, w in TILES + [(512, 1), (1024, 2)] if bn // (32 * w) >= 4
               for sp in (4, 8, 16, 32)])  # 4, 8 and 16 rows a thread (16: 2.26 instructions a weight, a few spills)
    if "stages" in sys.argv[4:]:
        # HALF2 with the next groups copied into shared memory (cp.async): the large GEMVs' HALF2 tiles
        # reached 56-63 % of the copy rate, and the 8-row tile's fewer instructions lost to the 4-row one's
        # fewer registers (more programs, more bytes in flight), so bytes in flight are what to add
        # (session 26). 128 registers and 68 KB of shared memory at 512 rows, 4 warps, 3 stages (sm_90 SASS).
        grid += [(bn, sp, w, st, False, True) for bn, w in TILES if bn // (32 * w) >= 4
                 for sp in (2, 4, 8, 16) for st in (3, 4)]
else:
    grid = [(*row, False) for row in grid]
grid = [(*row, 0) for row in grid]
grid = list(dict.fromkeys(grid))  # the app's tiles may be among the swept ones: each timed once
print(f"# {len(grid)} configs", flush=True)
def tile(c):
    """A tile's identity: (BLOCK_N, SPLIT, warps, PREFETCH, LOOP_STAGES, HALF2, L2_AHEAD), from a triton.Config or a row."""
    if isinstance(c, dict):
        return (c["BLOCK_N"], c["SPLIT"], c["num_warps"], c["PREFETCH"], c["LOOP_STAGES"], c.get("HALF2", False),
                c.get("L2_AHEAD", 0))
    return (c.kwargs["BLOCK_N"], c.kwargs["SPLIT"], c.num_warps, c.kwargs.get("PREFETCH", True),
            c.kwargs.get("LOOP_STAGES", 1), c.kwargs.get("HALF2", False), c.kwargs.get("L2_AHEAD", 0))


results = []
for n, k in SHAPES:
    if time.time() - t0 > BUDGET_S:
        break
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    q, s, o = int4.quantize(w)
    nbytes = q.numel() * q.element_size() + 2 * s.numel() * s.element_size()
    copies = max(2, math.ceil((400 << 20) / nbytes))
    qs = [q.clone() for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ int4.dequantize_reference(q, s, o, k, torch.float32).T
    # Room for every split swept (64 x N), more than the app's workspace allows (split_k.split_fits).
    ws = torch.empty(64, n, dtype=torch.float32, device=dev)
    lock = torch.zeros(n, dtype=torch.int32, device=dev)
    best = None
    for bn, sp, wp, st, pf, h2, _ahead in grid:
        cfg = {"BLOCK_N": bn, "SPLIT": sp, "num_warps": wp, "num_stages": 1, "PREFETCH": pf, "LOOP_STAGES": st}
        if h2:
            cfg["HALF2"] = True
        try:
            y = kt.gemv(x, q, s, o, k, (ws, lock), cfg)
            err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
            if err > 2e-2:
                print("bad", n, k, cfg, err, flush=True); continue
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for qq in qs[:2]:
                    kt.gemv(x, qq, s, o, k, (ws, lock), cfg)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for qq in qs:
                    kt.gemv(x, qq, s, o, k, (ws, lock), cfg)
            g.replay(); torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(3):
                g.replay()
            b.record(); torch.cuda.synchronize()
            ms = a.elapsed_time(b) / (3 * copies)
            del g
        except Exception as e:  # noqa
            print("fail", n, k, cfg, str(e)[:120], flush=True); continue
        row = {"n": n, "k": k, **cfg, "us": round(ms * 1000, 2), "of_copy": round(nbytes / ms / 1e6 / rate, 3)}
        results.append(row)
        if best is None or row["us"] < best["us"]:
            best = row
    top = sorted([r for r in results if (r["n"], r["k"]) == (n, k)], key=lambda r: r["us"])[:6]
    tuned = {tile(c) for c in kt._GEMV_CONFIGS}  # what the app tunes over
    cur = [r for r in results if (r["n"], r["k"]) == (n, k) and "us" in r and "tuned_pick" not in r and tile(r) in tuned]
    cb = min(cur, key=lambda r: r["us"]) if cur else None
    print(f"## {n}x{k} ({nbytes/1e6:.1f} MB) best of the app's configs: {cb}", flush=True)
    # What the app's autotuner picks for this shape (its timing, int4_triton.time_config), and how
    # that pick does back to back in a graph, as decode runs it.
    kt.gemv(x, q, s, o, k)
    torch.cuda.synchronize()
    pick = kt._gemv_kernel.best_config
    picked = [r for r in cur if tile(r) == tile(pick)]
    if picked and cb:
        tuned_row = {"tuned_pick": True, "n": n, "k": k, "tile": tile(pick), "us": picked[0]["us"], "app_best_us": cb["us"],
                     "sweep_best_us": best["us"] if best else None}
        results.append(tuned_row)
        print("   the autotuner's pick:", tuned_row, flush=True)
    for r in top:
        print("  ", r, flush=True)
    print(f"   elapsed {time.time()-t0:.0f} s", flush=True)
    del qs
    torch.cuda.empty_cache()
json.dump(results, open(sys.argv[2] if len(sys.argv) > 2 else "/dev/null", "w"))
