"""Decode speed under an 8 GiB cap: the fast int4 path against naive generate() in the same run.

For InternLM2-1.8B- and InternLM2.5-7B-shaped random-weight checkpoints, batch 1, a 512-token
prompt and 128 new tokens, each config in a fresh process (as a user starting the app), loaded
through the engine with an 8 GiB GPU budget (torch's allocator capped there):
  naive-fp16 / naive-nf4  the app's plain path: generate() + streamer, DynamicCache; an fp16 7B
                          offloads under 8 GiB with accelerate's copy-on-call hooks
  stream-fp16             the same, with offloaded layers page-locked and prefetched one layer
                          ahead on a copy stream (models/offload.py); its layer copies are timed
                          (rate while copying, the bus's idle time between copies)
  stream-fp16-prehook     the same with the earlier schedule: a layer's copy is issued when the host
                          reaches the layer before it (not as soon as its slot is free)
  fast-int4               our int4 kernels (models/kernels) + FastDecoder: the uncompiled step captured
                          as CUDA graphs at load (ready), the compiled step swapped in from a
                          background compile (full speed); the compile cache persists between the
                          children, so a second run of the same shape measures a warm-cache load
An offloaded model's roofline is the bus: bytes of its CPU layers per token over the page-locked
host-to-device copy rate measured in the same process.
Each reports TTFT, decode tok/s, peak VRAM (torch peak reserved + CUDA context), load (+compile)
time, and the bandwidth roofline measured in that process: a device-to-device copy (bytes read
+ written / time), and bytes read per token = weights (less the embedding table: one row is read)
+ the KV cache of the context (what attention must read; the fast path's windows read up to 2x that).
The fast path also reports one captured step's time (the device bound, without the host loop)
and the top kernels of a profiled decode.

    python bench/decode_speed.py --out results.jsonl --md table.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# qwen7b is the holdout shape: Qwen2.5-7B's sizes written as a Llama checkpoint (its q/k/v biases
# are 0.1 % of the bytes, so speed and memory follow the shape).
SHAPES = {"1.8b": "internlm2-chat-1.8b", "7b": "internlm2.5-7b-chat", "qwen7b": "qwen2.5-7b-instruct"}
LABELS = {"internlm2-chat-1.8b": "1.8B", "internlm2.5-7b-chat": "7B", "qwen2.5-7b-instruct": "Qwen-7B"}
# path -> (quantization, stream offloaded layers with models/offload.py)
PATHS = {"naive-fp16": ("none", False), "stream-fp16": ("none", True), "naive-nf4": ("4bit", False),
         "stream-fp16-prehook": ("none", True),  # streamed, with the schedule before prefetch-after-use
         "fast-int4": ("int4", False),
         # The fast path less one of its parts, to tell what each one brings (or breaks):
         "fast-int4-no-prefill-graphs": ("int4", False),  # prompt chunks unpadded and eager
         "fast-int4-whole-compile": ("int4", False),  # the whole forward compiled, not one layer for all
         "fast-int4-unfused": ("int4", False),  # q/k/v and gate/up kept as separate GEMVs (7 a layer, not 4)
         # rotation and the cache write as kernels of their own before the decode attention (before session 24)
         "fast-int4-separate-rotation": ("int4", False),
         # the residual add + RMSNorm as kernels of their own, not folded into the GEMVs (before session 27)
         "fast-int4-separate-norms": ("int4", False),
         "fast-int4-no-precompile": ("int4", False),  # the int4 kernels compiled one by one inside the warm-up
         # programmatic dependent launch (models/kernels/pdl.py) at level 1 (early launch) or 2 (+ L2 prefetch);
         # fast-int4 runs SMALLCHAT_PDL's level (0 unless set)
         "fast-int4-pdl1": ("int4", False), "fast-int4-pdl2": ("int4", False),
         "fast-int4-prefill-512": ("int4", False),  # prompt chunks of 512 tokens, not PREFILL_CHUNK's 1,024
         "fast-int4-triton-gemv": ("int4", False),  # the GEMV tiles chosen among Triton's only, not int4_mma's too
         # the decode attention as the Triton kernel on Hopper too, not the cluster kernel (attention_cluster.py)
         "fast-int4-triton-attention": ("int4", False),
         # the next token by torch's argmax, not the one-kernel argmax (models/kernels/argmax.py)
         "fast-int4-torch-argmax": ("int4", False)}
MiB, GiB = 1024**2, 1024**3


def copy_bandwidth(nbytes: int = 512 * MiB, reps: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read + bytes written."""
    import torch

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    rate = 2 * nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def host_to_device_bandwidth(nbytes: int = 256 * MiB, reps: int = 10) -> float:
    """Page-locked host-to-device copy rate in GB/s (the bus an offloaded model streams over)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    rate = nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rate


def pdl_level(model) -> int:
    """The programmatic-dependent-launch level the model's kernels were launched at (models/kernels/pdl.py)."""
    from models.kernels import pdl

    return pdl.level(next(model.parameters()).device)


def step_ms(fast, window: int | None = None, reps: int = 100, greedy: bool = True) -> float:
    """Mean time of one captured decode step at position 600 (attending over `window` cache positions;
    default: the smallest window that holds 600), greedy or sampled (temperature + top-p, the app's
    default), timed with events over `reps` replays."""
    import torch

    graph = fast.graphs[(greedy, window or fast._window_for(601))]
    with fast._busy, torch.inference_mode():  # the background compile's first run must not interleave
        fast._set_length(600)
        fast.step.zero_()
        graph.replay()
        ms = replay_ms(graph, reps)
        fast._set_length(0)
        fast.token_ids = []
    return ms


def replay_ms(graph, reps: int) -> float:
    """Mean ms of `reps` replays of a captured CUDA graph, timed with device events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def top_kernels(fast, tokenizer, ids, n: int = 12) -> list[dict]:
    """CUDA kernels of 32 decode steps, most time first (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.generation import SamplingSettings

    fast.token_ids = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        list(fast.stream(tokenizer, ids, SamplingSettings(max_new_tokens=33, temperature=0), threading.Event()))
        torch.cuda.synchronize()
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]:
        rows.append({"kernel": e.key[:90], "calls": e.count, "total_ms": e.device_time_total / 1e3})
    return rows


def measure(folder: str, path: str, budget_gib: float, prompt: int, new_tokens: int, context: int,
            profile_load: str | None = None) -> dict:
    """Load one path for one checkpoint and time TTFT, decode tok/s and peak VRAM (the load's
    cProfile to `profile_load` if given)."""
    import torch

    from models.catalog import load_catalog
    from models.engine import Engine
    from models.generation import SamplingSettings, stream_generate
    from models.loading import LoadSettings
    from models.memory import embedding_bytes, kv_bytes_per_token
    from models.quant import Quant

    engine = Engine(load_catalog())
    baseline = engine._baseline_used or 0
    runtime = engine.cuda_runtime_bytes()
    bandwidth = copy_bandwidth()
    quant, stream = PATHS[path]
    from models import fast_decode

    if path.startswith("fast-int4-pdl"):
        from models.kernels import pdl

        os.environ[pdl.ENV] = path.removeprefix("fast-int4-pdl")  # read at each launch: before the first
    if path == "fast-int4-prefill-512":
        # Prompt chunks of 512 tokens, the default until session 32: twice the chunks of today's 1,024, each
        # dequantizing every layer's weights once and paying its launches once (memory.PREFILL_CHUNK).
        from models import generation, memory, memory_split

        for module in (memory, memory_split, fast_decode, generation):
            module.PREFILL_CHUNK = 512
        fast_decode.PREFILL_BUCKETS = tuple(b for b in fast_decode.PREFILL_BUCKETS if b <= 512)
    if path == "fast-int4-torch-argmax":
        from models import token_sampling

        plain_next_token = token_sampling.next_token
        fast_decode.next_token = lambda logits, greedy, temperature, top_p, state=None: plain_next_token(
            logits, greedy, temperature, top_p)
    if path == "fast-int4-triton-attention":
        from models.kernels import decode_attention

        os.environ[decode_attention.CLUSTER_ENV] = "0"
    if path == "fast-int4-triton-gemv":
        from models.kernels import int4_mma

        os.environ[int4_mma.ENV] = "0"
    if path == "fast-int4-no-prefill-graphs":
        fast_decode.PREFILL_BUCKETS = ()
    if path == "fast-int4-unfused":
        from models import fused_projections

        fused_projections.fuse_projections = lambda model: 0
    if path == "fast-int4-separate-rotation":
        from models import fused_projections

        fused_projections.decode_step_attention = lambda *args: None
    if path == "fast-int4-separate-norms":
        from models import folded_norms

        folded_norms.folds_norms = lambda model: False
    if path == "fast-int4-no-precompile":
        from models.kernels import int4

        int4.start_precompile = lambda model: []
    if path == "fast-int4-whole-compile":
        from models import background_compile

        background_compile.supports_layer_loop = lambda model: False
    h2d = host_to_device_bandwidth()
    settings = LoadSettings(quant=Quant(quant), context_tokens=context, gpu_budget_bytes=int(budget_gib * GiB),
                            stream_offload=stream)
    from models import compile_cache

    warm_cache = compile_cache.size_bytes(engine.cache_dir) > 0
    started = time.perf_counter()
    if profile_load:  # where a load's seconds go, by function (cProfile: this thread only)
        import cProfile
        import io
        import pstats

        with cProfile.Profile() as prof:
            loaded = engine.load(folder, settings).loaded
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
        stats.print_stats(60)
        # The app's own functions (torch's recursive op dispatch crowds them out of the list above),
        # and the seconds spent compiling Python sources (an image without .pyc files pays them per process).
        stats.print_stats(r"/models/", 40)
        stats.print_stats(r"builtins.compile|_bootstrap>:\d+\(_load_unlocked\)", 5)
        Path(profile_load).write_text(text.getvalue())
    else:
        loaded = engine.load(folder, settings).loaded
    load_s = time.perf_counter() - started  # for the fast path: until the uncompiled step can answer
    if path == "stream-fp16-prehook" and loaded.streamer is not None:  # the schedule before prefetch-after-use
        loaded.streamer.prefetch_after_use = False
    ids = torch.randint(0, loaded.shape.vocab_size - 2, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingSettings(max_new_tokens=new_tokens, temperature=0)
    load_peak = torch.cuda.max_memory_reserved()
    extra: dict = {}
    if loaded.fast is not None:
        # Answers on the uncompiled graph step, right after the load, while the compile runs.
        loaded.fast.token_ids = []
        early = list(loaded.fast.stream(loaded.tokenizer, ids, greedy, threading.Event()))[-1]
        extra.update(uncompiled_ttft_ms=1e3 * early.stats.ttft_s, uncompiled_decode_tok_s=early.stats.decode_tokens_per_s,
                     uncompiled_step_ms=step_ms(loaded.fast))
        loaded.fast.wait_compiled()
        extra.update(full_speed_s=time.perf_counter() - started, compile_state=loaded.fast.compile_status(),
                     background_compile_s=loaded.fast.background_compile_seconds, warm_compile_cache=warm_cache,
                     phases={k: round(v, 2) for k, v in loaded.fast.phases.items()},
                     norms_folded=loaded.fast.norms_folded,  # folded_norms.py (or its fallback: separate kernels)
                     pdl_level=pdl_level(loaded.model))
        from models.kernels import int4_triton

        if int4_triton.available():  # each (N, K)'s GEMV tile: timed in a graph (or stored), or Triton's autotuner's
            extra["gemv_tiles"] = {key: str(int4_triton.tile_config(tile)) for key, tile in loaded.fast.gemv_tiles.items()}
            extra["gemv_tiles_autotuned"] = {str(key[:2]): str(cfg) for key, cfg in int4_triton._gemv_kernel.cache.items()}
    runs = []
    # Whether the int4 store's writer thread (loading._keep_int4) was still writing during the reported
    # run: sessions 28-29 saw a first load's streamed decode 30 % under its own graph step, with the
    # writer the suspect (it holding the GIL while the loop enqueues replays). Repeated below once it ends.
    extra["store_writing_during_decode"] = store_writer_alive()
    # and every other thread alive then (a first load may leave others behind: precompiles, tile timing)
    extra["threads_during_decode"] = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
    # A short first run pays one-off kernel loading; the second (full) run is reported.
    for sampling in (SamplingSettings(max_new_tokens=4, temperature=0), greedy):
        torch.cuda.synchronize()
        if loaded.fast is not None:
            loaded.fast.token_ids = []  # no prefix reuse: prefill all 512 tokens
            final = list(loaded.fast.stream(loaded.tokenizer, ids, sampling, threading.Event()))[-1]
        else:
            if loaded.streamer is not None and sampling is greedy:  # the reported run: time its layer copies
                loaded.streamer.start_trace()
                before = allocator_events()
            final = list(stream_generate(loaded.model, loaded.tokenizer, ids, sampling, threading.Event()))[-1]
            if loaded.streamer is not None and sampling is greedy:
                extra["copy_trace"] = loaded.streamer.stop_trace()
                # Allocator events during the answer: a retry frees cached memory, which waits for
                # every stream, the copy stream's layer in flight included.
                extra["allocator_events"] = {k: v - before[k] for k, v in allocator_events().items()}
        runs.append(final)
    final = runs[-1]
    if extra["store_writing_during_decode"] and loaded.fast is not None:
        extra["store_writing_during_decode"] = store_writer_alive()  # still writing when the run ended
        writer = store_writer()
        if writer is not None:
            writer.join()
        loaded.fast.token_ids = []
        again = list(loaded.fast.stream(loaded.tokenizer, ids, greedy, threading.Event()))[-1]
        extra["decode_tok_s_after_store_written"] = again.stats.decode_tokens_per_s
    free, total = torch.cuda.mem_get_info()
    runtime_now = (total - free) - baseline - torch.cuda.memory_reserved()
    peak = max(load_peak, torch.cuda.max_memory_reserved()) + max(runtime, runtime_now)
    kv_per_token = kv_bytes_per_token(loaded.shape, 2)
    kv_read = kv_per_token * (prompt + new_tokens // 2)  # the context each step must attend over, on average
    # Weights read per token: all but the embedding table (one row of it). For an offloaded model
    # this counts only the GPU-resident part; its streamed layers cross PCIe (far slower) instead.
    bytes_per_token = loaded.weights_bytes - embedding_bytes(loaded.shape, 2) + kv_read
    roofline = bandwidth * 1e9 / bytes_per_token
    row = {
        "gpu": torch.cuda.get_device_name(), "shape": SHAPES[Path(folder).name.split("-", 1)[1]], "path": path,
        "quant": quant, "stream_offload": stream, "budget_gib": budget_gib, "prompt": prompt, "new_tokens": final.stats.new_tokens,
        "ttft_ms": 1e3 * final.stats.ttft_s, "decode_tok_s": final.stats.decode_tokens_per_s,
        "first_run_ttft_ms": 1e3 * runs[0].stats.ttft_s, "load_peak_gib": load_peak / GiB,
        "peak_gib": peak / GiB, "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "runtime_mib": max(runtime, runtime_now) / MiB, "weights_gib": loaded.weights_bytes / GiB,
        "predicted_peak_gib": loaded.plan.predicted_peak_bytes / GiB, "split": loaded.split,
        "load_s": load_s, "compile_s": loaded.compile_seconds, "copy_gbps": bandwidth, "int4_stored": loaded.int4_stored,
        "bytes_per_token_gb": bytes_per_token / 1e9, "kv_read_gb": kv_read / 1e9, "roofline_tok_s": roofline,
        "fraction_of_roofline": (final.stats.decode_tokens_per_s or 0) / roofline, "context": context,
        "torch": torch.__version__,
    }
    row["h2d_gbps"] = h2d
    if loaded.split.get("cpu"):
        # An offloaded model reads its CPU layers over the bus every token: that is its roofline.
        offloaded = (loaded.streamer.host_bytes if loaded.streamer
                     else loaded.plan.weights_bytes - loaded.plan.gpu_weights_bytes)
        row["bus_gb_per_token"] = offloaded / 1e9
        row["bus_roofline_tok_s"] = h2d * 1e9 / offloaded
        row["fraction_of_bus_roofline"] = (final.stats.decode_tokens_per_s or 0) / row["bus_roofline_tok_s"]
        row["page_locked"] = bool(loaded.streamer and loaded.streamer.page_locked)
        if loaded.streamer is not None:
            # The same copy from the streamer's own buffers (malloc'd, then cudaHostRegister'ed) into
            # its staging slot: if this is slower than h2d_gbps (torch's cudaHostAlloc buffer), the
            # buffers, not the schedule, hold the streamed path under the bus roofline.
            row["streamer_h2d_gbps"] = loaded.streamer.copy_rate()
            row.update(host_breakdown(loaded.model, ids))
    row.update(extra)
    if loaded.fast is not None:
        row["step_ms"] = step_ms(loaded.fast)
        row["graph_tok_s"] = 1e3 / row["step_ms"]
        row["step_ms_whole_cache"] = step_ms(loaded.fast, loaded.fast.windows[-1])  # the pre-window read
        # What a user with the default temperature gets: the same step with top-p sampling of the logits.
        row["step_ms_sampled"] = step_ms(loaded.fast, greedy=False)
        plain = list(stream_generate(loaded.model, loaded.tokenizer, ids, SamplingSettings(max_new_tokens=16, temperature=0),
                                     threading.Event()))[-1]
        row["agree_with_plain_16"] = agree = sum(1 for _ in zip_prefix(plain.token_ids, final.token_ids))
        if agree < min(len(plain.token_ids), len(final.token_ids), 16):
            # Where the two greedy answers part: by how much the plain forward prefers its own token to
            # the fast path's, against the logits' scale (a near tie is within bf16's ~0.4 % of it).
            with torch.inference_mode():
                seq = torch.tensor([ids + plain.token_ids[:agree]], device=loaded.fast.device)
                logits = loaded.model(seq, use_cache=False).logits[0, -1].float()
            row["parting_margin"] = (logits[plain.token_ids[agree]] - logits[final.token_ids[agree]]).item()
            row["parting_logit_scale"] = logits.abs().max().item()
        row["top_kernels"] = top_kernels(loaded.fast, loaded.tokenizer, ids)
        long_ids = torch.randint(0, loaded.shape.vocab_size - 2, (context - 96,),
                                 generator=torch.Generator().manual_seed(1)).tolist()
        row.update(prompt_ttfts(loaded.fast, loaded.tokenizer, long_ids))
        if (512, loaded.fast.cache_len) in loaded.fast.prefill_graphs:
            row["prefill_512_graph_ms"] = prefill_graph_ms(loaded.fast, 512)  # over the whole cache, as before windows
            row["prefill_512_window_ms"] = {w: prefill_graph_ms(loaded.fast, 512, w) for b, w in loaded.fast.prefill_graphs
                                            if b == 512}
            row["prefill_512_kernels"] = prefill_kernels(loaded.fast, 512)
        # The naive baseline in the same process: the same prompts through the eager (unpadded,
        # uncaptured) multi-token forward, as before prefill graphs.
        buckets, loaded.fast.prefill_buckets = loaded.fast.prefill_buckets, ()
        loaded.fast.token_ids = []
        eager = list(loaded.fast.stream(loaded.tokenizer, ids, SamplingSettings(max_new_tokens=4, temperature=0),
                                        threading.Event()))[-1]
        row["eager_ttft_ms"] = 1e3 * eager.stats.ttft_s
        row.update({f"eager_{k}": v for k, v in prompt_ttfts(loaded.fast, loaded.tokenizer, long_ids).items()
                    if k.endswith("ttft_ms")})
        loaded.fast.prefill_buckets = buckets
    return row


def store_writer_alive() -> bool:
    """Whether the thread writing a freshly quantized model to the int4 store is running."""
    return store_writer() is not None


def store_writer() -> threading.Thread | None:
    """The thread writing a freshly quantized model to the int4 store, if it is running."""
    from models.loading import STORE_WRITER_THREAD

    return next((t for t in threading.enumerate() if t.name == STORE_WRITER_THREAD), None)


def allocator_events() -> dict:
    """torch's caching-allocator counters that mean a wait or a driver call (cumulative)."""
    import torch

    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc",
                                         "num_device_free", "num_ooms")}


def host_breakdown(model, ids: list[int], tokens: int = 16) -> dict:
    """Where an offloaded model's host time goes: generate() called directly (no streaming thread)
    against the app's path, and a cProfile of the direct call (the bus waits for the host each token)."""
    import cProfile
    import io
    import pstats

    import torch

    prompt = torch.tensor([ids], device=model.get_input_embeddings().weight.device)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    one, many = timed(1), timed(tokens + 1)
    with cProfile.Profile() as prof:
        timed(tokens + 1)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    if os.environ.get("SMALLCHAT_TRACE_OUT"):  # host and device on one timeline (chrome://tracing, Perfetto)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            timed(4)
        trace.export_chrome_trace(os.environ["SMALLCHAT_TRACE_OUT"])
    return {"direct_generate_tok_s": tokens / (many - one), "host_profile": text.getvalue()[-6000:]}


def prompt_ttfts(fast, tokenizer, long_ids: list[int]) -> dict:
    """TTFT of a fresh long prompt (no reuse), then of a 40-token new turn on that cached history."""
    import torch

    from models.generation import SamplingSettings

    one = SamplingSettings(max_new_tokens=8, temperature=0)
    for _ in range(2):  # the first pays one-off kernel loading at this length
        fast.token_ids = []
        fresh = list(fast.stream(tokenizer, long_ids, one, threading.Event()))[-1]
    turn = long_ids + fresh.token_ids + torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    reused = list(fast.stream(tokenizer, turn, one, threading.Event()))[-1]
    return dict(long_prompt=len(long_ids), long_ttft_ms=1e3 * fresh.stats.ttft_s,
                reused_turn_ttft_ms=1e3 * reused.stats.ttft_s, reused_tokens=reused.stats.reused_tokens,
                reused_turn_new_tokens=len(turn) - reused.stats.reused_tokens)


def prefill_graph_ms(fast, bucket: int, window: int | None = None, reps: int = 10) -> float:
    """Device time of one captured padded prefill chunk of `bucket` tokens attending over `window`
    cache positions (default: the whole cache) (the TTFT's GPU bound)."""
    import torch

    graph, _ = fast.prefill_graphs[(bucket, window or fast.cache_len)]
    with fast._busy, torch.inference_mode():
        fast._chunk_positions[:bucket].copy_(fast.kv_positions[:bucket])
        fast._chunk_last.fill_(bucket - 1)
        # Each replay advances the cache's write index by `bucket`: put it back to 0 before every
        # one (unreset, the 9th replay wrote past a 4k cache: a device-side assert on the H200).
        # The reset's small fills are timed with it (~0.05 ms beside a ~10 ms chunk).
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fast._set_length(0)
        graph.replay()
        start.record()
        for _ in range(reps):
            fast._set_length(0)
            graph.replay()
        end.record()
        end.synchronize()
        fast._set_length(0)
        fast.token_ids = []
    return start.elapsed_time(end) / reps


def prefill_kernels(fast, bucket: int = 512, reps: int = 4, n: int = 14) -> list[dict]:
    """CUDA kernels of one captured `bucket`-token prefill chunk over the whole cache, most time first
    (per chunk, torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph, _ = fast.prefill_graphs[(bucket, fast.cache_len)]
    with fast._busy, torch.inference_mode():
        fast._chunk_positions[:bucket].copy_(fast.kv_positions[:bucket])
        fast._chunk_last.fill_(bucket - 1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fast._set_length(0)
                graph.replay()
            torch.cuda.synchronize()
        fast._set_length(0)
        fast.token_ids = []
    return [{"kernel": e.key[:90], "calls": e.count // reps, "ms_per_chunk": e.device_time_total / 1e3 / reps}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]]


def zip_prefix(a, b):
    """Length of the common prefix of two token lists."""
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def parent(args) -> None:
    """Run every (model, path) in its own child process and collect the rows."""
    from bench.synth import write_random_llama
    from models.catalog import load_catalog

    catalog = load_catalog()
    work = Path(args.workdir)
    for spec in args.configs:
        key, path, *rest = spec.split(":")
        folder = work / f"random-{key}"
        if not (folder / "config.json").exists():
            t0 = time.perf_counter()
            write_random_llama(folder, catalog.get(SHAPES[key]).shape)
            print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
        new_tokens = int(rest[0]) if rest else args.new_tokens
        cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--path", path, "--out", args.out,
               "--new-tokens", str(new_tokens), "--prompt", str(args.prompt), "--budget", str(args.budget),
               "--context", str(args.context)]
        if args.profile_load:
            cmd += ["--profile-load", f"{args.out}.{key}-{path}.load_profile.txt"]
        t0 = time.perf_counter()
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
            rc, err = result.returncode, result.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"{spec}: rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            print(err[-2500:], flush=True)
            with open(f"{args.out}.{key}-{path}.stderr.log", "a") as f:  # the whole of it, for a post-mortem
                f.write(err)
    table = markdown(args.out)
    print(table)
    if args.md:
        Path(args.md).write_text(table)


def markdown(path: str) -> str:
    """The results file as a Markdown table."""
    rows = [json.loads(line) for line in open(path)]
    if not rows:
        return "no results\n"
    lines = [f"GPU: {rows[0]['gpu']} (torch {rows[0]['torch']}); budget {rows[0]['budget_gib']:.0f} GiB (allocator capped); "
             f"prompt {rows[0]['prompt']} tokens, greedy; copy bandwidth measured in each process.", "",
             "| model | path | new tok | TTFT ms | decode tok/s | × naive nf4 | peak GiB | load s (compile s) | "
             "GB read/token | roofline tok/s | of roofline | graph step tok/s | sampled step tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nf4 = {r["shape"]: r["decode_tok_s"] for r in rows if r["path"] == "naive-nf4"}
    fp16 = {r["shape"]: r["decode_tok_s"] for r in rows if r["path"] == "naive-fp16"}
    for r in rows:
        model = LABELS.get(r["shape"], r["shape"])
        # Each path against its naive counterpart: streamed fp16 offload against accelerate's.
        base = fp16 if r["path"].startswith("stream-fp16") else nf4
        speedup = f"{r['decode_tok_s'] / base[r['shape']]:.1f}×" if base.get(r["shape"]) else "–"
        if r["path"].startswith("stream-fp16"):
            speedup += " fp16"
        roofline, bound = r.get("bus_roofline_tok_s", r["roofline_tok_s"]), " (bus)" if "bus_roofline_tok_s" in r else ""
        split = r["split"]
        where = f" ({split['gpu']}/{split['gpu'] + split['cpu'] + split['disk']} layers on GPU)" if split.get("cpu") else ""
        compile_s = f" ({r['compile_s']:.1f})" if r["compile_s"] else ""
        graph = f"{r['graph_tok_s']:.0f}" if "graph_tok_s" in r else "–"
        sampled = f"{1e3 / r['step_ms_sampled']:.0f}" if "step_ms_sampled" in r else "–"
        lines.append(
            f"| {model} | {r['path']}{where} | {r['new_tokens']} | {r['ttft_ms']:.0f} | {r['decode_tok_s'] or 0:.1f} | {speedup} | "
            f"{r['peak_gib']:.2f} | {r['load_s']:.1f}{compile_s} | {r.get('bus_gb_per_token', r['bytes_per_token_gb']):.2f}{bound} | "
            f"{roofline:.1f}{bound} | {100 * (r['decode_tok_s'] or 0) / roofline:.0f}% | {graph} | {sampled} |")
    for r in rows:
        if "streamer_h2d_gbps" in r:
            lines += ["", f"{LABELS.get(r['shape'], r['shape'])} {r['path']}: host-to-device {r['h2d_gbps']:.1f} GB/s from "
                          f"torch's pinned buffer, {r['streamer_h2d_gbps']:.1f} GB/s from the streamer's registered layer "
                          f"buffers; page-locked: {r['page_locked']}."]
            if r.get("allocator_events"):
                lines[-1] += " Allocator events during the answer: " + ", ".join(
                    f"{k} {v}" for k, v in r["allocator_events"].items()) + "."
            if "direct_generate_tok_s" in r:
                lines[-1] += f" generate() called directly (no streaming thread): {r['direct_generate_tok_s']:.2f} tok/s."
            trace = r.get("copy_trace") or {}
            if trace.get("copies"):
                lines[-1] += (f" During the reported answer: {trace['copies']} layer copies, {trace['gbps_while_copying']:.1f} GB/s "
                              f"while copying, the bus busy {100 * trace['busy_fraction']:.0f} % of {trace['span_s']:.1f} s.")
    fast_rows = [r for r in rows if "full_speed_s" in r]
    if fast_rows:
        lines += ["", "Fast path from the load (ready = the uncompiled CUDA-graph step answers; full speed = the "
                      "compiled step swapped in from the background compile):", "",
                  "| model | compile cache | ready s | full speed s | uncompiled tok/s | compiled tok/s | TTFT 512 ms | "
                  "TTFT long ms (prompt) | reused-turn TTFT ms (new tokens) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fast_rows:
            model = LABELS.get(r["shape"], r["shape"])

            def was(key: str) -> str:  # the eager prefill's figure in the same process, when measured
                return f" (eager {r['eager_' + key]:.0f})" if "eager_" + key in r else ""
            lines.append(
                f"| {model} | {'warm' if r['warm_compile_cache'] else 'cold'}{' + int4 store' if r.get('int4_stored') else ''} | "
                f"{r['load_s']:.1f} | {r['full_speed_s']:.1f} | "
                f"{r['uncompiled_decode_tok_s'] or 0:.0f} | {r['decode_tok_s'] or 0:.0f} | {r['ttft_ms']:.0f}{was('ttft_ms')} | "
                f"{r['long_ttft_ms']:.0f}{was('long_ttft_ms')} ({r['long_prompt']}) | "
                f"{r['reused_turn_ttft_ms']:.0f}{was('reused_turn_ttft_ms')} ({r['reused_turn_new_tokens']}) |")
        for r in fast_rows:
            if "decode_tok_s_after_store_written" in r:
                lines += ["", f"{LABELS.get(r['shape'], r['shape'])} {r['path']}: the int4 store was being written during "
                              f"the reported answer ({r['decode_tok_s'] or 0:.0f} tok/s"
                              f"{', and still when it ended' if r['store_writing_during_decode'] else ''}); "
                              f"the same answer once the write ended: {r['decode_tok_s_after_store_written'] or 0:.0f} tok/s."]
        phased = [r for r in fast_rows if r.get("phases")]
        if phased:
            lines += ["", "Where the ready and full-speed seconds go (load = weights read, fused, quantized onto the GPU):", ""]
            for r in phased:
                parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}" for k, v in r["phases"].items())
                lines.append(f"- {LABELS.get(r['shape'], r['shape'])} {r['path']}: load {r['load_s'] - r['compile_s']:.1f}, "
                             f"{parts} s")
        graphs = [r for r in fast_rows if "prefill_512_graph_ms" in r]
        if graphs:
            lines += ["", "Device time of one captured 512-token prefill chunk over the whole cache (the TTFT's GPU bound): "
                      + ", ".join(f"{LABELS.get(r['shape'], r['shape'])} {r['prefill_512_graph_ms']:.1f} ms" for r in graphs)]
            for r in graphs:
                if r.get("prefill_512_window_ms"):
                    lines.append(f"- {LABELS.get(r['shape'], r['shape'])}, by attention window (positions: ms): " + ", ".join(
                        f"{w}: {ms:.1f}" for w, ms in sorted(r["prefill_512_window_ms"].items(), key=lambda x: int(x[0]))))
    for r in rows:
        if r.get("prefill_512_kernels"):
            model = LABELS.get(r["shape"], r["shape"])
            lines += ["", f"Kernels of one captured 512-token prefill chunk, {model} {r['path']}:", "",
                      "| kernel | calls | ms |", "|---|---|---|"]
            lines += [f"| `{k['kernel']}` | {k['calls']} | {k['ms_per_chunk']:.2f} |" for k in r["prefill_512_kernels"]]
        if r.get("top_kernels"):
            model = LABELS.get(r["shape"], r["shape"])
            lines += ["", f"Top kernels, {model} {r['path']}, 32 decode steps (+ one 512-token prefill):", "",
                      "| kernel | calls | total ms |", "|---|---|---|"]
            lines += [f"| `{k['kernel']}` | {k['calls']} | {k['total_ms']:.2f} |" for k in r["top_kernels"]]
    return "\n".join(lines) + "\n"


def child(args) -> None:
    """One measurement in this (child) process; prints its row as JSON."""
    row = measure(args.folder, args.path, args.budget, args.prompt, args.new_tokens, args.context, args.profile_load)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true")
    p.add_argument("--folder")
    p.add_argument("--path", default="fast-int4", choices=list(PATHS))
    p.add_argument("--configs", nargs="+", default=[
        "1.8b:fast-int4", "7b:fast-int4", "1.8b:naive-nf4", "1.8b:naive-fp16", "7b:naive-nf4", "7b:naive-fp16:16",
        "7b:stream-fp16:32"],
        help="shape:path[:new_tokens]")
    p.add_argument("--budget", type=float, default=8.0)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--child-timeout", type=float, default=420)
    p.add_argument("--workdir", default="/tmp/smallchat-bench")
    p.add_argument("--out", default="decode_speed.jsonl")
    p.add_argument("--md")
    p.add_argument("--profile-load", nargs="?", const=True, default=None,
                   help="cProfile each load (parent: a flag; child: the file to write)")
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
