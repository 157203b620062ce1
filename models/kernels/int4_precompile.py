"""The Triton kernels a model's fast path will run (int4 GEMVs, dequantize, the q/k/v decode attention),
compiled in threads while its weights are still being loaded.

Why: a model's first forward otherwise compiles them one after another inside its warm-up (five
tiles and the dequantize, ~0.7 s each on an H200 host; the decode attention's two kernels were left to
the first decode steps: a cold 7B's capture of its decode graphs took 4.3 s against 1.3 s warm,
bench/results/store_profile_h200_s26.md). Triton releases the GIL for most of a
compile (its passes and ptxas), so threads overlap them, and the loader starts them while the
weights are still being quantized or read. The compiled kernels land in Triton's in-memory and
on-disk caches, where the first call finds them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import int4_triton, pdl

log = logging.getLogger(__name__)


def compile_jobs(shapes, dtype: torch.dtype, pdl_level: int = pdl.OFF) -> list:
    """One warm-up call per distinct compiled kernel that GEMVs and dequantizes of these shapes need.

    A shape is (N, K), or (N, K, epilogue) for a GEMV that decode runs (and its tile is timed) with that
    int4_epilogue epilogue instead of the plain store. `pdl_level`: the GEMVs' (pdl.level), which
    changes the compiled kernel."""
    from .int4_epilogue import STORE

    seen, jobs = set(), []
    gemv, dequant = int4_triton._gemv_body, int4_triton._dequant_t_kernel
    fusion = int4_triton.FP_FUSION
    for n, k, *epilogue in dict.fromkeys(shapes):
        groups = -(-k // 128)
        # Triton compiles a kernel per specialization: each int argument is specialised on being 1 or a
        # multiple of 16, and EVEN on the shape. Shapes that agree share kernels, so each is compiled
        # once here. (A wrong guess only leaves a compile to the first call, as without precompile.)
        spec = tuple((v == 1, v % 16 == 0) for v in (n, k, groups))
        for cfg in int4_triton._fitting_splits(int4_triton._GEMV_CONFIGS, {"N": n}):
            even = n % cfg.kwargs["BLOCK_N"] == 0 and k % 128 == 0
            for kind in epilogue or (STORE,):
                if ("gemv", spec, even, str(cfg), kind) not in seen:
                    seen.add(("gemv", spec, even, str(cfg), kind))
                    # Dtypes stand in for tensors (Triton's MockTensor): nothing is allocated or launched.
                    args = (dtype, torch.int32, torch.bfloat16, torch.bfloat16, dtype, torch.float32, torch.int32,
                            n, k, groups, n, n, int4_triton.ONE_BITS, dtype, dtype, dtype, torch.float32, 0, 0.0)
                    jobs.append(lambda a=args, c=cfg, e=kind: gemv.warmup(
                        *a, grid=(1,), EPILOGUE=e, enable_fp_fusion=fusion, **pdl.launch_options(pdl_level),
                        **c.all_kwargs()))
        if ("dequant", spec) not in seen:
            seen.add(("dequant", spec))
            args = (torch.int32, torch.bfloat16, torch.bfloat16, dtype, n, k, groups, n, n, n)
            jobs.append(lambda a=args: dequant.warmup(*a, grid=(1,), BLOCK_N=256, num_warps=4, enable_fp_fusion=fusion))
    return jobs


def precompile(shapes, dtype: torch.dtype = torch.bfloat16, attention: tuple[int, int, int, bool] | None = None,
               workers: int | None = None) -> list[Future]:
    """Start compiling, in threads, every GEMV tile and the dequantize for these (N, K) shapes, and the q/k/v
    decode attention for `attention` (int4.attention_layout) if given (Triton's, and on Hopper the cluster
    kernel's); their futures.

    Nothing to do without CUDA (on the CPU the kernels run in Triton's interpreter, which does not compile)."""
    if not int4_triton.available() or not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return []
    from .triton_threads import serialize_source_parsing

    serialize_source_parsing()  # the compiles below run in threads at once
    device = torch.device("cuda", torch.cuda.current_device())
    level = pdl.level(device)
    jobs = compile_jobs(shapes, dtype, level)
    if attention is not None:
        from . import attention_cluster
        from .decode_attention import qkv_compile_jobs

        jobs += qkv_compile_jobs(*attention, dtype, level)
        jobs += attention_cluster.compile_jobs(*attention, dtype, level, device)
    pool = ThreadPoolExecutor(max_workers=workers or max(1, min(len(jobs), (os.cpu_count() or 2) - 1)),
                              thread_name_prefix="int4-precompile")
    futures = [pool.submit(job) for job in jobs]
    pool.shutdown(wait=False)  # the threads end when their compiles do
    return futures


def wait_precompiled(futures: list[Future]) -> int:
    """Wait for precompile's compiles; how many failed (logged: the first call then compiles that kernel itself)."""
    failed = 0
    for future in futures:
        if (error := future.exception()) is not None:
            failed += 1
            log.warning("precompiling an int4 kernel failed; it compiles at its first call instead: %s", error)
    return failed
