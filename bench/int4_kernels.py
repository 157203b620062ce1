"""Int4 kernels against the bandwidth roofline and cuBLAS, in one run on one GPU.

1. Correctness: our Triton GEMV and dequantize against int4.dequantize_reference over many shapes
   (odd N, K not a multiple of the group), fresh random data each, output poisoned first.
2. Decode (M = 1): the linear layers of a whole decode step (distinct weights per layer, so nothing
   lives in L2), captured in one CUDA graph, for bf16 cuBLAS, torch's tinygemm int4 (torchao
   tile-packed: the previous fast path) and our GEMV. Effective GB/s = weight bytes / time, and its
   fraction of the device copy rate measured in the same process.
3. Prefill (M = 512, 4096): the same layers as one forward, bf16 cuBLAS vs tinygemm vs our
   dequantize + cuBLAS. `ours-fused` is ours with q/k/v and gate/up as one linear each (4 GEMVs a
   layer instead of 7, as the app loads them: models/fused_projections.py).
4. The floor: what a kernel that does nothing costs in a graph, next to our GEMV on tiny matrices.
5. Tuning: what timing the GEMV's tile configs costs at a model's first load of a shape, as the
   app times them and with Triton's default, and whether the two pick the same config.

    python bench/int4_kernels.py [--shapes 7b 1.8b qwen7b] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (K, N) of one decoder layer's linears: q, k, v, o, gate, up, down.
LAYERS = {
    "7b": (32, [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]),
    "1.8b": (24, [(2048, 2048), (2048, 1024), (2048, 1024), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048)]),
    "qwen7b": (28, [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584), (3584, 18944), (3584, 18944), (18944, 3584)]),
}


VOCAB = {"7b": 92544, "1.8b": 92544, "qwen7b": 152064}  # the lm_head's outputs (an int4 GEMV too)


def fused(linears: list) -> list:
    """The same layer with q/k/v and gate/up as one linear each (models/fused_projections.py)."""
    (k, q), (_, kv), _, o, (_, i), _, down = linears
    return [(k, q + 2 * kv), o, (k, 2 * i), down]


CHECK_SHAPES = [(1, 128), (7, 200), (33, 1000), (4096, 4096), (1024, 4096), (4096, 14336), (14336, 4096),
                (2048, 8192), (92544 // 8, 4096), (513, 3584), (18944, 3584), (3, 64)]


def copy_rate() -> float:
    """Device-to-device copy in GB/s, bytes read + written (bench/decode_speed.py's measurement)."""
    from bench.decode_speed import copy_bandwidth

    return copy_bandwidth(nbytes=1 << 30, reps=10)


def check(rows: list) -> None:
    """Our kernels equal the reference on every shape (relative error of a bf16 result)."""
    from models.kernels import int4, int4_triton

    for n, k in CHECK_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, s, o = int4.quantize(w)
        ref_w = int4.dequantize_reference(q, s, o, k, torch.float32)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ws = int4.new_workspace(n, x.device)
        y = int4_triton.gemv(x, q, s, o, k, ws)
        # A split-K race would show as results that move between identical calls.
        repeat_same = all(torch.equal(y, int4_triton.gemv(x, q, s, o, k, ws)) for _ in range(20))
        ref = x.float() @ ref_w.T
        gemv_err = float((y.float() - ref).norm() / ref.norm())
        d = int4_triton.dequantize_t(q, s, o, k)
        deq_err = float((d.float().T - ref_w).abs().max() / ref_w.abs().max())
        quant_err = float((ref_w - w.float()).norm() / w.float().norm())
        ok = gemv_err < 1e-2 and deq_err < 1e-2 and not torch.isnan(y).any() and repeat_same
        rows.append({"check": f"{n}x{k}", "gemv_rel_err": gemv_err, "dequant_rel_err": deq_err,
                     "quant_rel_err": quant_err, "repeatable": repeat_same, "ok": bool(ok)})
        print(json.dumps(rows[-1]), flush=True)


def launch_floor(rows: list, launches: int = 160) -> None:
    """What one kernel costs in a CUDA graph when it does (almost) nothing: the floor under every GEMV.

    `launches` kernels back to back in one graph (a 7B decode step ran 224 GEMVs, 128 fused): an
    empty Triton kernel on 1 and on 528 programs, our GEMV on a 128x128 matrix (one program, no
    split) and on a 1024x4096 k_proj (2.2 MB, 0.5 us at the copy rate)."""
    import triton

    from models.kernels import int4, int4_triton

    x = torch.zeros(1, device="cuda")
    cases = {"empty kernel, 1 program": lambda: _empty_kernel[(1,)](x),
             "empty kernel, 528 programs": lambda: _empty_kernel[(528,)](x)}
    for n, k in [(128, 128), (1024, 4096)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q, s, o = int4.quantize(w)
        xin = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ws = int4.new_workspace(n, xin.device)
        int4_triton.gemv(xin, q, s, o, k, ws)  # tune once, outside the graph
        cases[f"our GEMV {n}x{k}"] = (lambda xin=xin, q=q, s=s, o=o, k=k, ws=ws:
                                      int4_triton.gemv(xin, q, s, o, k, ws))
    for name, fn in cases.items():
        ms = graph_ms(lambda fn=fn: [fn() for _ in range(launches)])
        rows.append({"floor": name, "launches": launches, "us_per_kernel": round(1e3 * ms / launches, 2),
                     "triton": triton.__version__})
        print(json.dumps(rows[-1]), flush=True)


try:
    import triton as _triton
    import triton.language as _tl

    @_triton.jit
    def _empty_kernel(x_ptr):
        """Does nothing: its cost in a graph is the launch and scheduling floor."""
        pass
except ImportError:  # a CPU-only torch: this bench needs a GPU anyway
    _empty_kernel = None


def tuning(rows: list, shapes: list, repeats: int = 3) -> None:
    """What tuning the GEMV costs at a model's first load, and what it picks, against Triton's default.

    For each (N, K) a fused model runs (its 4 layer linears and the lm_head): every config the app
    tunes over is timed with Triton's default (25 ms warm-up, 100 ms of runs) as the reference, then
    `repeats` times as the app times it (int4_triton.time_config). Reported: seconds per shape each
    way, and how much slower (by the reference) the config the app's timing picked is than the
    reference's best; 0 % means the same pick.
    """
    import triton.testing

    from models.kernels import int4, int4_triton
    from models.kernels.split_k import split_fits

    for shape in shapes:
        _, linears = layer_shapes("ours-fused", shape)
        for k, n in linears + [(linears[0][0], VOCAB[shape])]:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            q, sc, o = int4.quantize(w)
            del w
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            ws = int4.new_workspace(n, x.device)
            configs = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                       for c in int4_triton._GEMV_CONFIGS if split_fits(c.kwargs["SPLIT"], n)]
            calls = [lambda c=c: int4_triton.gemv(x, q, sc, o, k, ws, c) for c in configs]
            for call in calls:  # compiled before any timing, as the app's tuning finds them after the first
                call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            # do_bench's default return is the mean (Triton 3.6 returns a float for one quantile, 3.9 a list)
            reference = [triton.testing.do_bench(call) for call in calls]
            default_s = time.perf_counter() - t0
            best = min(reference)
            picks, seconds = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                timed = [int4_triton.time_config(call, (0.5, 0.2, 0.8))[0] for call in calls]
                seconds.append(time.perf_counter() - t0)
                picks.append(reference[timed.index(min(timed))] / best - 1)
            rows.append({"tuning": shape, "n": n, "k": k, "configs": len(configs), "default_s": round(default_s, 3),
                         "bounded_s": round(sum(seconds) / repeats, 3), "best_us": round(best * 1e3, 2),
                         "pick_slower_max": round(max(picks), 4), "pick_slower_mean": round(sum(picks) / repeats, 4)})
            print(json.dumps(rows[-1]), flush=True)
            del q, sc, o, ws
            torch.cuda.empty_cache()


def graph_ms(fn, reps: int = 20) -> float:
    """Mean ms of `reps` replays of fn captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    from bench.decode_speed import replay_ms

    return replay_ms(g, reps)


def timed_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def layer_shapes(kind: str, shape: str) -> tuple[int, list]:
    """(layers, the (K, N) of one layer's linears) for `kind`: ours-fused runs q/k/v and gate/up as one each."""
    n_layers, linears = LAYERS[shape]
    return n_layers, fused(linears) if kind == "ours-fused" else linears


def build(kind: str, shape: str):
    """One decode step's linears as modules of `kind` (bf16 | tinygemm | ours | ours-fused)."""
    from models.kernels.int4 import Int4Linear

    n_layers, linears = layer_shapes(kind, shape)
    mods = []
    for _ in range(n_layers):
        layer = []
        for k, n in linears:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            torch.nn.init.normal_(lin.weight, std=0.02)
            if kind == "tinygemm":
                from torchao.quantization import Int4WeightOnlyConfig, quantize_

                wrapper = torch.nn.Sequential(lin)
                quantize_(wrapper, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
                lin = wrapper[0]
            elif kind.startswith("ours"):
                lin = Int4Linear.from_linear(lin)
            layer.append(lin)
        mods.append(layer)
    if kind.startswith("ours"):
        from models.kernels.int4 import share_workspace

        share_workspace(torch.nn.ModuleList([m for layer in mods for m in layer]))
    return mods


def step_fn(mods, shape: str, tokens: int, kind: str = "ours"):
    _, linears = layer_shapes(kind, shape)
    inputs = {k: torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for k, _ in linears}

    def run():
        y = None
        for layer in mods:
            for m, (k, _) in zip(layer, linears):
                y = m(inputs[k])
        return y
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["7b", "1.8b", "qwen7b"])
    p.add_argument("--kinds", nargs="*", default=["bf16", "tinygemm", "ours", "ours-fused"])
    p.add_argument("--no-floor", action="store_true", help="skip the per-kernel launch floor")
    p.add_argument("--no-tuning", action="store_true", help="skip timing the GEMV's tuning at a first load")
    p.add_argument("--prefill", nargs="*", type=int, default=[512, 4096])
    p.add_argument("--out", default="")
    a = p.parse_args()
    cache = os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton"))
    torch.manual_seed(0)
    rows: list = []
    rate = copy_rate()
    head = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": round(rate, 1),
            "triton_cache": cache}
    print(json.dumps(head), flush=True)
    rows.append(head)
    check(rows)
    if not a.no_floor:
        launch_floor(rows)
    if not a.no_tuning:
        tuning(rows, a.shapes)
    for shape in a.shapes:
        n_layers, linears = LAYERS[shape]
        params = n_layers * sum(k * n for k, n in linears)
        for kind in a.kinds:
            t0 = time.perf_counter()
            try:
                mods = build(kind, shape)
                build_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                one = step_fn(mods, shape, 1, kind)
                one()  # autotunes ours on first call per (N, K)
                torch.cuda.synchronize()
                tune_s = time.perf_counter() - t1
                ms = graph_ms(one)
            except Exception as e:  # noqa: BLE001 - a kernel missing on this GPU is a row, not a crash
                rows.append({"shape": shape, "kind": kind, "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            nbytes = params * 2 if kind == "bf16" else params // 2 + params // 128 * 4
            row = {"shape": shape, "kind": kind, "decode_ms": round(ms, 4), "weight_gb": round(nbytes / 1e9, 3),
                   "eff_gbps": round(nbytes / ms / 1e6, 1), "of_copy": round(nbytes / ms / 1e6 / rate, 3),
                   "build_s": round(build_s, 1), "first_call_s": round(tune_s, 1)}
            for t in a.prefill:
                try:
                    row[f"prefill_{t}_ms"] = round(timed_ms(step_fn(mods, shape, t, kind), reps=3), 2)
                except torch.OutOfMemoryError:
                    row[f"prefill_{t}_ms"] = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            del mods
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\n| shape | kernel | decode ms (linears of one step) | GB/s | of copy rate | prefill 512 ms | prefill 4096 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "decode_ms" in r:
            print(f"| {r['shape']} | {r['kind']} | {r['decode_ms']} | {r['eff_gbps']} | {r['of_copy']:.0%} | "
                  f"{r.get('prefill_512_ms')} | {r.get('prefill_4096_ms')} |")
    floors = [r for r in rows if "floor" in r]
    if floors:
        print("\n| kernel, back to back in one CUDA graph | us per kernel |\n|---|---|")
        for r in floors:
            print(f"| {r['floor']} | {r['us_per_kernel']} |")
    tunes = [r for r in rows if "tuning" in r]
    if tunes:
        print("\n| shape | N x K | configs | tuning s, Triton's default | tuning s, the app's | pick slower than the best, max (mean) |"
              "\n|---|---|---|---|---|---|")
        for r in tunes:
            print(f"| {r['tuning']} | {r['n']}x{r['k']} | {r['configs']} | {r['default_s']} | {r['bounded_s']} | "
                  f"{r['pick_slower_max']:.1%} ({r['pick_slower_mean']:.1%}) |")
    bad = [r for r in rows if r.get("ok") is False]
    print(f"\n{head['gpu']}, copy {head['copy_gbps']} GB/s; checks: {sum(1 for r in rows if r.get('ok'))} ok, "
          f"{len(bad)} failed")


if __name__ == "__main__":
    main()
