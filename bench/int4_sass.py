"""The int4 GEMV's machine code for Hopper (sm_90), read without a GPU.

Triton compiles for a target it is told, and its wheel carries ptxas and cuobjdump, so the SASS of
our kernel can be studied on any machine: instructions in the main loop per int4 weight, what
kind, registers, stack (spills), and the layout Triton gave the weight tile. Launch-time
specializations are reproduced: 16-byte aligned pointers and integer arguments divisible by 16,
as Triton's JIT marks them when N and K are multiples of 16.

Why: at batch 1 a decode step's large GEMVs were found issue-bound on the H200 (BENCHMARKS.md,
sessions 16-18), so instructions per weight is the figure a kernel change must lower before a GPU
run is worth its minutes. Timing still needs the GPU (bench/int4_kernels.py, int4_gemv_sweep.py).

    python bench/int4_sass.py [--configs 256,16,4 64,16,1] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "o_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
             "lock_ptr": "*i32", "N": "i32", "K": "i32", "G_COUNT": "i32", "stride_w": "i32", "stride_s": "i32",
             "one_bits": "i32", "res_ptr": "*bf16", "gamma_ptr": "*bf16", "h_ptr": "*bf16", "sq_ptr": "*fp32",
             "n_sq": "i32", "eps": "fp32"}  # the last six: the epilogue's (models/kernels/int4_epilogue.py)
DIVISIBLE_BY_16 = ["x_ptr", "w_ptr", "s_ptr", "o_ptr", "y_ptr", "ws_ptr", "lock_ptr", "N", "K", "stride_w", "stride_s",
                   "res_ptr", "gamma_ptr", "h_ptr", "sq_ptr"]
_ADDRESS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)(.*)")


def compile_for_hopper(fn, constexprs: dict, num_warps: int, extra_args: dict | None = None, capability: int = 90):
    """The Triton kernel `fn` compiled for sm_`capability` (default 90, Hopper) with `constexprs`, as a launch
    with aligned arguments would."""
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    from models.kernels import int4_triton

    import inspect

    # Constexprs left out take the kernel's defaults, as a launch that does not name them would.
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
                  **constexprs}
    signature = {name: kind for name, kind in SIGNATURE.items() if name in fn.arg_names}  # probes have fewer
    signature.update(**(extra_args or {}), **{name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16 if name in fn.arg_names}
    source = tc.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 1, "enable_fp_fusion": int4_triton.FP_FUSION}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(kernel) -> dict:
    """Registers per thread and stack bytes (spills) of a compiled kernel, read from its cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "stack": int(re.search(r"STACK:(\d+)", usage).group(1))}


def sass_of(kernel) -> str:
    """The SASS (cuobjdump -sass) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def main_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the instructions inside the longest backward branch: the loop over groups."""
    rows = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_ADDRESS.match, sass.splitlines()) if m]
    loop = None
    for address, op, rest in rows:
        target = re.search(r"(0x[0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            span = (int(target.group(1), 16), address)
            if loop is None or span[1] - span[0] > loop[1] - loop[0]:
                loop = span
    if loop is None:
        return []
    return [(op, rest) for address, op, rest in rows if loop[0] <= address <= loop[1]]


def _kind(op: str, rest: str = "") -> str:
    """What an opcode does here: the IMAD and HFMA2 forms ptxas uses for moves and shifts are named so."""
    if op.startswith(("MOV", "IMAD.MOV")):
        return "moves"
    if op.startswith("HFMA2.MMA"):  # HFMA2.MMA -RZ, RZ, <const> materialises a constant; otherwise a real HFMA2
        return "moves" if rest.lstrip().split(",")[1:3] == [" -RZ", " RZ"] else "HFMA2"
    if op.startswith(("SHF", "IMAD.SHL")):
        return "shifts"
    if op.startswith(("IMAD.U32", "PRMT")):  # bf16 -> fp32 of x (x << 16, done as x * 0x10000 or a byte permute)
        return "converts"
    return op.split(".")[0]


def analyse(block_n: int, split: int, num_warps: int, prefetch: bool = True, fn=None, loop_stages: int = 1,
            half2: bool = False) -> dict:
    """Instructions per weight in the GEMV's main loop for one tile config, and what they are."""
    from models.kernels import int4_triton

    constexprs = {"BLOCK_N": block_n, "SPLIT": split, "EVEN": True, "PREFETCH": prefetch}
    if loop_stages != 1:
        constexprs["LOOP_STAGES"] = loop_stages
    if half2:
        constexprs["HALF2"] = True
    kernel = compile_for_hopper(fn or int4_triton._gemv_body.fn, constexprs, num_warps)
    sass, usage = sass_of(kernel), resource_usage(kernel)
    layout = re.search(r"#blocked = #ttg.blocked<\{(.*?)\}>", kernel.asm["ttgir"])
    fields = [re.search(name + r" = \[([\d, ]+)\]", layout.group(1)) if layout else None
              for name in ("sizePerThread", "threadsPerWarp", "warpsPerCTA")]
    size, threads, warps = (f"({f.group(1)})" if f else "?" for f in fields)
    # Words of one group (16 rows x BLOCK_N columns) a thread holds, each carrying 8 weights.
    words = 16 * block_n // (32 * num_warps)
    loop = main_loop(sass)
    kinds: dict[str, int] = {}
    for op, rest in loop:
        kinds[_kind(op, rest)] = kinds.get(_kind(op, rest), 0) + 1
    return {"block_n": block_n, "split": split, "warps": num_warps, "prefetch": prefetch, "loop_stages": loop_stages,
            "shared_bytes": kernel.metadata.shared, "async_copies": len(re.findall(r"\bLDGSTS", sass)),
            "loop_instructions": len(loop),
            "weights_per_thread": 8 * words, "per_weight": round(len(loop) / (8 * words), 2),
            "registers": usage["registers"], "stack": usage["stack"],
            "layout": f"size {size}, threads {threads}, warps {warps}",
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    """Command-line entry point: a table over tile configs (default: the ones the app tunes over)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", help="BLOCK_N,SPLIT,warps[,prefetch 0/1[,loop stages[,half2 0/1]]] "
                   "(default: the app's tuned configs)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    import triton

    from models.kernels import int4_triton

    configs = ([tuple(int(v) for v in c.split(",")) for c in a.configs] if a.configs else
               [(c.kwargs["BLOCK_N"], c.kwargs["SPLIT"], c.num_warps, c.kwargs.get("PREFETCH", True),
                c.kwargs.get("LOOP_STAGES", 1), c.kwargs.get("HALF2", False))
                for c in int4_triton._GEMV_CONFIGS])
    lines = [f"Triton {triton.__version__}, sm_90, int4 GEMV main loop (one group of 128 k per iteration)", "",
             "| BLOCK_N, SPLIT, warps, prefetch, loop stages, half2 | weight tile layout | instr / weight | registers | "
             "stack B | shared KB | cp.async (LDGSTS) | FFMA + HFMA2 | LOP3 | shifts | moves | loads + x converts | "
             "FADD + FMUL + HADD2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for block_n, split, warps, *rest in configs:
        prefetch = bool(rest[0]) if rest else True
        stages = rest[1] if len(rest) > 1 else 1
        half2 = bool(rest[2]) if len(rest) > 2 else False
        r = analyse(block_n, split, warps, prefetch, loop_stages=stages, half2=half2)
        k, w = r["kinds"], r["weights_per_thread"]

        def per(*names: str) -> str:
            return f"{sum(k.get(n, 0) for n in names) / w:.2f}"
        lines.append(f"| {block_n}, {split}, {warps}, {'yes' if prefetch else 'no'}, {stages}, {'yes' if half2 else 'no'} "
                     f"| {r['layout']} | **{r['per_weight']}** | {r['registers']} | {r['stack']} | "
                     f"{r['shared_bytes'] // 1024} | {r['async_copies']} | {per('FFMA', 'HFMA2')} | {per('LOP3')} | "
                     f"{per('shifts')} | {per('moves')} | {per('LDG', 'converts', 'F2F', 'F2FP')} | "
                     f"{per('FADD', 'FMUL', 'HADD2')} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
