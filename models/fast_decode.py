"""Fast batch-1 decoding: a static KV cache, one token step replayed as a CUDA graph, and no
host-device sync per token; the step is compiled in the background and swapped in when ready.

The shape is gpt-fast's: `_prefill` (the prompt in a few big forward passes) -> `_decode_step`
(one token, all state in device buffers) -> `_decode` (replay the step k times, then read the k
ids back through a pinned buffer). `FastDecoder.stream` streams through the same answer shell as models.generation.stream_generate.

Why each piece:
- Static cache + fixed-shape buffers: the step has one shape, so it can be captured as a CUDA
  graph; its ~300 kernels then launch as one (launch overhead is most of a naive decode step on
  a fast GPU).
- Ready in seconds: warm_up captures the *uncompiled* step (a couple of seconds), so a model
  answers right after its load. torch.compile of the same step (one decoder layer compiled for
  all, models/layer_step.py: ~10 s for a 7B on an H200 the first time, ~4 s from the on-disk
  cache) runs in a background thread (models/background_compile.py); its first run and the capture
  of the compiled graphs wait for the decoder to be idle, so an answer never waits for a compile
  and a compile never runs inside an answer.
- No sync per token: the step writes its token into `out[step]` on the device and feeds it to
  the next step itself; the host reads ids every `chunk` tokens (and checks EOS and Stop then).
  A few tokens past EOS may be computed and thrown away; their cache entries are never used.
- Prefix reuse: the decoder keeps the token ids its cache holds. A new prompt sharing a prefix
  prefills only the rest; entries beyond the new end are stale, and an explicit attention
  mask (key position <= query position) makes them invisible until they are overwritten.
- Decode attention is one fused kernel over the cache window, query heads grouped per KV head
  (models/attention.py), not SDPA, whose masked kernel reads a long cache at a fraction of the
  memory bandwidth for a single query.
- Attention reads only the filled part of the cache: the step takes a window of the first W
  cache positions (W = 512, 1k, 2k, ... up to the whole cache), one CUDA graph per window, and
  each chunk of tokens replays the smallest window that holds it. Full-length prompt chunks do
  the same (a graph per window for the largest bucket): a long prompt's first chunks then
  attend over 512 or 1k positions, not the whole cache. Over a 4k cache that read was
  ~0.5 ms of a 4.2 ms 7B step whatever the chat's length (bench/results/decode_speed_h200_s15.md).
  The compiled step is compiled once with the window length dynamic, not once per window.
- On the int4 path each residual add + RMSNorm is folded into the GEMVs before and after it
  (folded_norms.py): two kernels fewer a layer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import torch

from .attention import attach_decode_workspace, use_fast_attention
from .background_compile import BackgroundCompile
from .answer_stream import AnswerJob, StreamUpdate, TokenSink, stream_answer
from .generation import SamplingSettings, _device_peak, stream_generate
from .kv_cache import common_prefix_length
from .layer_step import LayerLoop, supports_layer_loop
from .memory import PREFILL_CHUNK
from .kernels.argmax import new_state as new_argmax_state
from .token_sampling import next_token

log = logging.getLogger(__name__)
CHUNK_TOKENS = 8  # tokens decoded between two host reads (EOS / Stop checks) on a GPU
# A new turn after prefix reuse leaves a few prompt tokens to prefill. Up to this many go through
# the captured one-token step (a few ms each at 7B) instead of an eager multi-token forward,
# whose per-layer Python and launch overhead made most of the reused-turn TTFT (BENCHMARKS.md).
REPLAY_PREFILL_MAX = 32
# Longer prompt chunks are padded up to one of these lengths and run as a captured CUDA graph:
# an eager 512-token forward of a 7B spent ~70 of its ~96 ms launching kernels from Python
# (BENCHMARKS.md, TTFT). Padding is harmless: the pad tokens' keys land past the prompt, where
# no query attends (the mask is by position), and the next write overwrites them. The 512 bucket
# keeps a 512-token prompt from being padded to a whole chunk (29 ms TTFT for a 7B on an H100).
PREFILL_BUCKETS = (64, 128, 256, 512, PREFILL_CHUNK)
STREAM_INTERVAL_S = 0.05  # text updates to the UI at most this often
CACHE_ALIGN = 64  # static cache length multiple (aligned matmuls in decode attention)
FIRST_WINDOW = 512  # the smallest attention window; each next one doubles, up to the whole cache
# ----- attention -------------------------------------------------------------------------
def _fix_dynamic_rope(model, max_context: int) -> int:
    """Dynamic-NTK RoPE changes its frequencies only past the trained length, via a host-side
    branch that a CUDA graph cannot hold. Below that length it is plain RoPE: use that, and cap
    the context there. Returns the (possibly capped) context."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, str) and "dynamic" in rope_type:
        max_context = min(max_context, int(rotary.original_max_seq_len))
        rotary.rope_type = "default"  # same inv_freq as long as positions stay below that length
    return max_context


def attention_windows(cache_len: int) -> list[int]:
    """Attention window lengths for a cache of `cache_len` positions: 512, 1024, ... and the whole cache."""
    windows, w = [], FIRST_WINDOW
    while w < cache_len:
        windows.append(w)
        w *= 2
    return windows + [cache_len]


# ----- the decoder -----------------------------------------------------------------------
class FastDecoder(BackgroundCompile):
    """Owns a model's static KV cache and its captured decode step; streams answers fast.

    Args:
        model: a loaded causal LM (Llama-style attention through transformers' interface).
        max_context: tokens the static cache holds (prompt + answer).
        compile: torch.compile the step in the background (start_background_compile); default:
            on a CUDA device. True also compiles on a CPU (tests), without graphs.
        chunk: tokens decoded between host reads (default CHUNK_TOKENS on a GPU, 1 on a CPU).
        replay_prefill_max: prompt remainders up to this long are fed through the one-token step
            (default REPLAY_PREFILL_MAX with CUDA graphs; 0 otherwise, where one forward is faster).
        compile_cache_dir: the app's cache folder; compiled kernels are kept under it (compile_cache).
        prefill_buckets: chunk lengths prompts are padded to (default PREFILL_BUCKETS with CUDA graphs,
            each captured at warm_up; none otherwise: an unpadded forward is as fast without graphs).
    """

    def __init__(self, model, max_context: int, compile: bool | None = None, chunk: int | None = None,
                 replay_prefill_max: int | None = None, compile_cache_dir=None,
                 prefill_buckets: tuple[int, ...] | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = model.get_input_embeddings().weight.device
        on_gpu = self.device.type == "cuda"
        self.use_graphs = on_gpu
        self.compile_enabled = on_gpu if compile is None else compile
        self.compile_cache_dir = compile_cache_dir
        self.chunk = chunk or (CHUNK_TOKENS if on_gpu else 1)
        if replay_prefill_max is None:
            replay_prefill_max = REPLAY_PREFILL_MAX if self.use_graphs else 0
        self.replay_prefill_max = replay_prefill_max
        if prefill_buckets is None:
            prefill_buckets = PREFILL_BUCKETS if self.use_graphs else ()
        if any(b > PREFILL_CHUNK for b in prefill_buckets):
            raise ValueError(f"prefill buckets must be at most PREFILL_CHUNK ({PREFILL_CHUNK}): {prefill_buckets}")
        self.prefill_buckets = tuple(sorted(prefill_buckets))
        use_fast_attention(model)
        self.max_context = _fix_dynamic_rope(model, max_context)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = model.get_input_embeddings().weight.dtype
        with torch.inference_mode():
            # At least one slot more than the context: the background compile's first run writes its
            # keys/values there (position max_context), which no answer ever attends to. The length
            # is a multiple of 64: an odd length (4097) made cuBLAS run decode attention in a slow
            # unaligned kernel, 134 us a layer on an H200 (bench/results/decode_speed_h200.md).
            longest = -(-(self.max_context + 1) // CACHE_ALIGN) * CACHE_ALIGN
            self.windows = attention_windows(longest)
            self.window = longest  # the window the step attends over (set per chunk: _step_for)
            # One aligned block more than the longest window: every window is then a strict prefix
            # of the cache (a window as long as the cache made torch.compile fix its length).
            cache_len = self.cache_len = longest + CACHE_ALIGN
            self.cache = StaticCache(config=config, max_cache_len=cache_len)
            self.cache.early_initialization(1, config.num_key_value_heads, head_dim, dtype, self.device)
            attach_decode_workspace(model, self.device)
            # The uncompiled step runs the layers as the compiled one does (layer_step.py): the same
            # computation as the model's forward, and a fused attention then rotates, writes its cache
            # and attends in one op (attention.decode_step_attention).
            self._layer_loop = LayerLoop(model, self.cache) if supports_layer_loop(model) else None
            dev = self.device
            self.kv_positions = torch.arange(cache_len, device=dev)  # [L]
            self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # next input token
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
            self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index into `out`
            self.out = torch.zeros(self.max_context, dtype=torch.long, device=dev)  # ids decoded this answer
            self.temperature = torch.ones(1, device=dev)
            self.top_p = torch.ones(1, device=dev)
            self.argmax_state = new_argmax_state(dev)  # the one-kernel argmax's two words (kernels/argmax.py)
            self.host = torch.zeros(self.max_context, dtype=torch.long, pin_memory=on_gpu)
            self._scratch_token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # the compile's first run
            self._scratch_pos = torch.full((1,), self.max_context, dtype=torch.long, device=dev)
            # A padded prompt chunk: its ids, its positions, and the index of its last real token.
            # Fixed buffers (and views of them), so that a captured graph reads what the host set.
            width = max(self.prefill_buckets, default=0)
            self._chunk_ids = torch.zeros(1, width, dtype=torch.long, device=dev)
            self._chunk_positions = torch.zeros(width, dtype=torch.long, device=dev)
            self._chunk_last = torch.zeros(1, dtype=torch.long, device=dev)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.token_ids: list[int] = []  # tokens whose keys/values the cache holds, in order
        self.reused_tokens = 0  # prompt tokens the last answer took from the cache
        self.graphs: dict[tuple[bool, int], torch.cuda.CUDAGraph] = {}  # (greedy?, window) -> captured step
        # (bucket, window) -> (captured padded forward, its logits): captured once at warm_up, never
        # recaptured (the prefill runs the uncompiled model: its matmuls are cuBLAS's, nothing to compile).
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compile_seconds = 0.0  # warm_up: capturing the uncompiled step (what a load waits for)
        self.phases: dict[str, float] = {}  # seconds of each part of warm_up and of the background compile
        self.gemv_tiles: dict[str, int] = {}  # the int4 GEMV tile of each "NxK" (kernels/gemv_tiles.choose_tiles)
        self.captures = 0  # graph captures so far (warm-up and the compiled swap only: never per request)
        self.compile_state = "off" if not self.compile_enabled else "pending"  # pending | compiling | compiled | failed
        self.compile_error = ""
        self.background_compile_seconds = 0.0  # start of the background compile to the swap
        self._compile_started = 0.0
        self._compile_thread: threading.Thread | None = None
        self._first_compiled_run = threading.Event()  # set once the compiled step has run once
        self.compiled_layer_loop = False  # the compiled step is one layer compiled for all (layer_step.py)
        if self.compile_enabled:  # each decoder (one per load) compiles its own step; allow many loads
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._forward = self._forward_eager  # swapped for the compiled step when it is ready
        self._busy = threading.Lock()
        self._closed = threading.Event()

    def close(self, wait_s: float = 60.0) -> None:
        """The model is being unloaded: a background compile still running ends without swapping in.

        Its thread holds the model until it ends, so the memory would stay taken after the unload:
        wait for it (up to `wait_s`). Tracing cannot be interrupted, but Inductor is skipped once
        closed (_inductor_unless_closed), so that is the tracing's few seconds at most.
        """
        self._closed.set()
        self.graphs = {}
        self.prefill_graphs = {}
        thread = self._compile_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_s)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static KV cache (allocated in full up front)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    # ----- steps ---------------------------------------------------------------------
    def _forward_eager(self, token: torch.Tensor, pos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] (fp32) of one token at `pos`; writes its keys/values at `pos`.

        `positions` is the window of cache positions attended over (a prefix of kv_positions,
        longer than `pos`); its length sets the attention's read.
        """
        if self._layer_loop is not None:
            return self._layer_loop.logits(token, pos, positions)
        mask = (positions <= pos).view(1, 1, 1, -1)  # stale entries past `pos` are invisible
        out = self.model(input_ids=token, position_ids=pos.view(1, 1), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Next token id [1], on the device: argmax, or temperature + top-p sampling."""
        return next_token(logits, greedy, self.temperature, self.top_p, self.argmax_state)

    def _decode_step(self, greedy: bool) -> None:
        """One token: forward, sample, and advance every buffer, all on the device."""
        nxt = self._sample(self._forward(self.token, self.pos, self.kv_positions[:self.window]), greedy)
        self.out.index_copy_(0, self.step, nxt)
        self.token.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        self.step.add_(1)

    def _window_for(self, end: int) -> int:
        """The smallest attention window holding cache positions 0 .. end-1."""
        return next((w for w in self.windows if w >= end), self.windows[-1])

    def _step_for(self, greedy: bool, end: int) -> Callable[[], None]:
        """The decode step for tokens at positions below `end`: a graph replay, or an eager step."""
        window = self._window_for(end)
        if self.graphs:
            return self.graphs[(greedy, window)].replay

        def eager() -> None:
            self.window = window
            self._decode_step(greedy)
        return eager

    def _set_length(self, n: int) -> None:
        """Make the cache hold its first `n` tokens: the next write goes to position n."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)
        self.pos.fill_(n)

    def _prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run ids[start:] through the model in chunks (cache already holds ids[:start]); last logits."""
        rest = torch.tensor(ids[start:], dtype=torch.long, device=self.device)  # one host-to-device copy
        logits = None
        for a in range(start, len(ids), PREFILL_CHUNK):
            chunk = rest[a - start:a - start + PREFILL_CHUNK]
            t = chunk.shape[0]
            self._set_length(a)  # a padded chunk advanced the cache's write index past its real tokens
            bucket = self._bucket_for(a, t)
            window = self._prefill_window_for(bucket, a + bucket) if bucket else 0
            if bucket is None:
                positions = self.kv_positions[a:a + t]
                mask = (self.kv_positions[None, :] <= positions[:, None]).view(1, 1, t, -1)  # [1, 1, T, L]
                logits = self.model(input_ids=chunk.view(1, -1), position_ids=positions.view(1, -1), attention_mask=mask,
                                    past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
                continue
            self._chunk_ids[0, :t].copy_(chunk)  # the pad keeps whatever ids were there: never attended to
            self._chunk_positions[:bucket].copy_(self.kv_positions[a:a + bucket])
            self._chunk_last.fill_(t - 1)
            captured = self.prefill_graphs.get((bucket, window))
            if captured is None:
                logits = self._padded_forward(bucket, window)
            else:
                graph, out = captured
                graph.replay()
                logits = out.clone()  # the graph's output buffer is overwritten by its next replay
        self._set_length(len(ids))
        return logits

    def _bucket_for(self, start: int, tokens: int) -> int | None:
        """The padded length for a chunk of `tokens` written from `start` (None: run it unpadded)."""
        return next((b for b in self.prefill_buckets if b >= tokens and start + b <= self.cache_len), None)

    def _prefill_windows(self, bucket: int) -> list[int]:
        """Attention windows a chunk padded to `bucket` runs with: every window for the largest bucket
        (long prompts, whose early chunks need few positions), only the whole cache for the rest
        (short remainders: their attention is small, and each graph costs capture time at load)."""
        if bucket != max(self.prefill_buckets, default=bucket):
            return [self.cache_len]
        return [w for w in self.windows if w >= bucket] + [self.cache_len]

    def _prefill_window_for(self, bucket: int, end: int) -> int:
        """The smallest of the bucket's windows holding cache positions 0 .. end-1."""
        return next(w for w in self._prefill_windows(bucket) if w >= end)

    def _padded_forward(self, bucket: int, window: int) -> torch.Tensor:
        """Logits [1, V] (fp32) of the chunk's last real token; the chunk buffers hold `bucket` tokens,
        which attend over the first `window` cache positions."""
        positions = self._chunk_positions[:bucket]
        mask = (self.kv_positions[None, :window] <= positions[:, None]).view(1, 1, bucket, window)  # [1, 1, T, W]
        out = self.model(input_ids=self._chunk_ids[:, :bucket], position_ids=positions.view(1, -1), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=self._chunk_last)
        return out.logits[:, -1].float()

    def _prefill_pairs(self) -> list[tuple[int, int]]:
        """Every (bucket, window) a prompt chunk can run with: what warm_up captures."""
        return [(b, w) for b in self.prefill_buckets if b <= self.cache_len for w in self._prefill_windows(b)]

    def _run_prefill_buckets(self) -> None:
        """Run every (bucket, window)'s padded forward once from position 0, each with its own valid last index."""
        for bucket, window in self._prefill_pairs():
            self._set_length(0)
            self._chunk_positions[:bucket].copy_(self.kv_positions[:bucket])
            self._chunk_last.fill_(bucket - 1)
            self._padded_forward(bucket, window)

    def _capture_prefill_graphs(self) -> None:
        """Capture the padded forward of every bucket (warm_up; the caller holds _busy)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first runs (cuBLAS heuristics, Triton loading) off the capture stream
            self._run_prefill_buckets()
        torch.cuda.current_stream(self.device).wait_stream(side)
        # The graphs never run at once and each keeps its output alive: one pool serves them all
        # (its size is the largest bucket's activations plus one layer's dequantized weight).
        pool = torch.cuda.graph_pool_handle()
        for bucket, window in self._prefill_pairs():
            self._set_length(0)
            # The graph reads these at each replay; set here so that a capture sees valid indices.
            self._chunk_positions[:bucket].copy_(self.kv_positions[:bucket])
            self._chunk_last.fill_(bucket - 1)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._padded_forward(bucket, window)
            self.prefill_graphs[(bucket, window)] = (graph, out)
            self.captures += 1
        torch.cuda.synchronize(self.device)

    def _prefill_by_steps(self, ids: list[int], start: int, step: Callable[[], None]) -> torch.Tensor:
        """Feed ids[start:] one token at a time through the decode step; the token sampled after the last.

        Each step writes its token's keys/values, samples, and advances `pos`; the sampled token is
        then overwritten with the next prompt token (a device copy: no sync, graph-safe).
        """
        rest = torch.tensor(ids[start:], dtype=torch.long, device=self.device)
        self._set_length(start)
        self.step.zero_()
        for i in range(len(rest)):
            self.token.copy_(rest[i].view(1, 1))
            step()
        return self.out[len(rest) - 1].view(1)

    def _capture_graphs(self, n: int) -> None:
        """Capture the current step (greedy and sampling, every window) as CUDA graphs; the caller holds _busy."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first runs (kernel loading, int4 tuning) off the capture stream
            for greedy in (True, False):
                for window in self.windows:
                    self.window = window
                    # One run per shape loads its kernels; the very first runs twice (tuning, lazy inits).
                    for _ in range(2 if (greedy, window) == (True, self.windows[0]) else 1):
                        self._set_length(n)
                        self.step.zero_()
                        self._decode_step(greedy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # graphs never run at once: they share their scratch memory
        graphs = {}
        for greedy in (True, False):
            for window in self.windows:
                self.window = window
                self._set_length(n)
                self.step.zero_()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._decode_step(greedy)
                graphs[(greedy, window)] = graph
                self.captures += 1
        torch.cuda.synchronize(self.device)
        self.window = self.windows[-1]
        self.graphs = graphs  # replaces the previous step's graphs (and frees them) in one go

    def warm_up(self) -> float:
        """Capture the uncompiled step as CUDA graphs (greedy and sampling); seconds taken.

        Call once per model load: requests only replay what was captured. Compiling the step
        is start_background_compile's job, so a load waits seconds, not minutes.
        """
        try:
            return self._warm_up_once()
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - only the folded step is retried; anything else is raised below
            if self._layer_loop is None or not self._layer_loop.folded:
                raise
            # The norms folded into the GEMVs (folded_norms.py) are the newest kernels of the step: if they
            # fail on this GPU, the step runs them as separate kernels, as before, rather than not at all.
            log.warning("the decode step with its norms folded into the int4 GEMVs failed; running them as "
                        "separate kernels", exc_info=True)
            self._layer_loop = LayerLoop(self.model, self.cache, fold_norms=False)
            return self._warm_up_once()

    @property
    def norms_folded(self) -> bool:
        """Whether the one-token step runs with its RMSNorms folded into the int4 GEMVs (folded_norms.py)."""
        return self._layer_loop is not None and self._layer_loop.folded

    def _warm_up_once(self) -> float:
        started = time.perf_counter()
        with self._busy, torch.inference_mode():
            n = min(8, self.max_context - 4)
            self._prefill(list(range(n)), 0)
            if self.use_graphs:
                torch.cuda.synchronize(self.device)
                marks = [started, time.perf_counter()]  # first forward: kernel loads, cuBLAS and attention set-up
                self._capture_graphs(n)  # its first runs tune the GEMV tiles per shape
                marks.append(time.perf_counter())
                self._capture_prefill_graphs()
                marks.append(time.perf_counter())
                for name, t0, t1 in zip(("first_forward", "decode_graphs", "prefill_graphs"), marks, marks[1:]):
                    self.phases[f"warm_up_{name}_s"] = t1 - t0
            else:
                self._decode_step(True)
                self._run_prefill_buckets()  # what the capture runs first, checked without a GPU too
            self._set_length(0)
            self.token_ids = []
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds

    # ----- one answer ----------------------------------------------------------------
    def _generate(self, input_ids: list[int], sampling: SamplingSettings, stop_event: threading.Event,
                  sink: TokenSink) -> list[int]:
        """Prefill (reusing the cached prefix), then decode in chunks; returns the new ids."""
        greedy = sampling.temperature <= 0
        max_new = max(1, min(sampling.max_new_tokens, self.max_context - len(input_ids)))
        keep = min(common_prefix_length(self.token_ids, input_ids), len(input_ids) - 1)
        self.reused_tokens = max(0, keep)
        sink.note(reused_tokens=self.reused_tokens)
        self.token_ids = []  # unknown until this answer is done
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if not greedy:
            self.temperature.fill_(sampling.temperature)
            self.top_p.fill_(sampling.top_p)
        if 0 < len(input_ids) - self.reused_tokens <= self.replay_prefill_max:
            first = self._prefill_by_steps(input_ids, self.reused_tokens, self._step_for(greedy, len(input_ids)))
        else:
            first = self._sample(self._prefill(input_ids, self.reused_tokens), greedy)
        self.token.copy_(first.view(1, 1))
        new = [int(first.item())]  # the one sync before the first token is shown (TTFT)
        sink.tokens(new)
        finished = new[0] in self.eos_ids or max_new == 1 or stop_event.is_set()
        self.step.zero_()
        launched, pending = 0, deque()
        while not finished:
            # Keep two chunks in flight: the GPU never waits for the host reading the previous one.
            while launched < max_new - 1 and len(pending) < 2:
                n = min(self.chunk, max_new - 1 - launched)
                # This chunk writes positions up to len(input_ids) + launched + n - 1.
                step = self._step_for(greedy, len(input_ids) + launched + n)
                for _ in range(n):
                    step()
                self.host[launched:launched + n].copy_(self.out[launched:launched + n], non_blocking=True)
                event = None
                if self.device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                pending.append((event, launched, launched + n))
                launched += n
            if not pending:
                break
            event, a, b = pending.popleft()
            if event is not None:
                event.synchronize()
            ids = self.host[a:b].tolist()
            for i, token in enumerate(ids):
                if token in self.eos_ids:
                    ids, finished = ids[:i + 1], True
                    break
            new.extend(ids)
            sink.tokens(ids)
            finished = finished or len(new) >= max_new or stop_event.is_set()
        for event, _, _ in pending:  # steps already queued: let them end before the lock is released
            if event is not None:
                event.synchronize()
        # The cache holds the prompt and every new token but the last (never fed back).
        self.token_ids = list(input_ids) + new[:-1]
        return new

    def stream(self, tokenizer, input_ids: list[int], sampling: SamplingSettings, stop_event: threading.Event,
               on_worker_done: Callable[[], None] | None = None, sent_at: float | None = None) -> Iterator[StreamUpdate]:
        """Stream an answer through the shared answer shell (models/answer_stream.py), like stream_generate
        (same updates, stats, contract, `sent_at`).

        Text updates are coalesced to one per STREAM_INTERVAL_S. `on_worker_done` runs in the
        worker thread when the GPU work has ended (the engine releases its lock there).
        """
        if len(input_ids) + 1 > self.max_context:  # cannot happen through the engine; stay correct anyway
            return stream_generate(self.model, tokenizer, input_ids, sampling, stop_event, None, on_worker_done,
                                   sent_at)

        def produce(sink: TokenSink) -> None:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                with self._busy, torch.inference_mode():
                    self._generate(input_ids, sampling, stop_event, sink)
                    # Read while this answer still owns the decoder (and the GPU): once the lock
                    # is released, another session's answer may change both.
                    sink.note(peak_bytes=_device_peak(self.device))
            except BaseException:
                self.token_ids = []  # the cache is in an unknown state
                raise

        job = AnswerJob(produce=produce, device=self.device, prompt_tokens=len(input_ids),
                        max_new_tokens=sampling.max_new_tokens, eos_ids=frozenset(self.eos_ids),
                        context_limit=self.max_context, min_interval_s=STREAM_INTERVAL_S, name="fast-decode",
                        sent_at=sent_at)
        return stream_answer(job, tokenizer, stop_event, on_worker_done)
