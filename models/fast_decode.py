"""Fast batch-1 decoding: a static KV cache, one compiled token step replayed as a CUDA graph,
and no host-device sync per token.

The shape is gpt-fast's: `_prefill` (the prompt in a few big forward passes) -> `_decode_step`
(one token, all state in device buffers) -> `_decode` (replay the step k times, then read the k
ids back through a pinned buffer). `FastDecoder.stream_generate` has the signature of
models.generation.stream_generate, so the engine can call either (see `decoder_for`).

Why each piece:
- Static cache + fixed-shape buffers: the step has one shape, so it compiles once and can be
  captured as a CUDA graph; its ~300 kernels then launch as one (launch overhead is most of a
  naive decode step on a fast GPU).
- No sync per token: the step writes its token into `out[step]` on the device and feeds it to
  the next step itself; the host reads ids every `chunk` tokens (and checks EOS and Stop then).
  A few tokens past EOS may be computed and thrown away; their cache entries are never used.
- Prefix reuse: the decoder keeps the token ids its cache holds. A new prompt sharing a prefix
  prefills only the rest; entries beyond the new end are stale, and an explicit attention
  mask (key position <= query position) makes them invisible until they are overwritten.
- Decode attention is two small matmuls over the cache (query heads grouped per KV head)
  instead of SDPA: SDPA's masked kernel runs one thread block per head for a single query,
  which reads a long cache at a fraction of the memory bandwidth.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

import torch

from .generation import (GenerationStats, IncrementalDecoder, SamplingSettings, StreamUpdate, _device_peak, start_worker,
                         stream_generate)
from .kv_cache import common_prefix_length
from .memory import PREFILL_CHUNK

ATTENTION_NAME = "fast_decode"
CHUNK_TOKENS = 8  # tokens decoded between two host reads (EOS / Stop checks) on a GPU
# A new turn after prefix reuse leaves a few prompt tokens to prefill. Up to this many go through
# the captured one-token step (a few ms each at 7B) instead of an eager multi-token forward,
# whose per-layer Python and launch overhead made most of the reused-turn TTFT (BENCHMARKS.md).
REPLAY_PREFILL_MAX = 32
STREAM_INTERVAL_S = 0.05  # text updates to the UI at most this often
_DONE = object()


# ----- attention -------------------------------------------------------------------------
def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one query token over the whole static cache; anything else goes to SDPA.

    query [B, Hq, 1, D]; key/value [B, Hkv, L, D]; attention_mask bool [B, 1, 1, L] (True = attend).
    Returns [B, 1, Hq, D] like transformers' attention functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    q = query.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]: the query heads that share a KV head
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # [B, Hkv, G, L]
    scores = scores.masked_fill(~attention_mask.view(b, 1, 1, -1), float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, D]
    return out.reshape(b, hq, 1, d).transpose(1, 2), None


def use_fast_attention(model) -> None:
    """Route the model's attention through `_decode_attention` (SDPA for every other case)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks for the plain generate() path
    model.config._attn_implementation = ATTENTION_NAME


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


# ----- the decoder -----------------------------------------------------------------------
class FastDecoder:
    """Owns a model's static KV cache and its captured decode step; streams answers fast.

    Args:
        model: a loaded causal LM (Llama-style attention through transformers' interface).
        max_context: tokens the static cache holds (prompt + answer).
        compile: torch.compile the step and capture CUDA graphs (default: on a CUDA device).
        chunk: tokens decoded between host reads (default CHUNK_TOKENS on a GPU, 1 on a CPU).
        replay_prefill_max: prompt remainders up to this long are fed through the one-token step
            (default REPLAY_PREFILL_MAX with CUDA graphs; 0 otherwise, where one forward is faster).
    """

    def __init__(self, model, max_context: int, compile: bool | None = None, chunk: int | None = None,
                 replay_prefill_max: int | None = None):
        from transformers import StaticCache

        self.model = model
        self.device = model.get_input_embeddings().weight.device
        on_gpu = self.device.type == "cuda"
        self.use_graphs = on_gpu if compile is None else (compile and on_gpu)
        self.chunk = chunk or (CHUNK_TOKENS if on_gpu else 1)
        if replay_prefill_max is None:
            replay_prefill_max = REPLAY_PREFILL_MAX if self.use_graphs else 0
        self.replay_prefill_max = replay_prefill_max
        use_fast_attention(model)
        self.max_context = _fix_dynamic_rope(model, max_context)
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = model.get_input_embeddings().weight.dtype
        with torch.inference_mode():
            self.cache = StaticCache(config=config, max_cache_len=self.max_context)
            self.cache.early_initialization(1, config.num_key_value_heads, head_dim, dtype, self.device)
            dev = self.device
            self.kv_positions = torch.arange(self.max_context, device=dev)  # [L]
            self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # next input token
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
            self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index into `out`
            self.out = torch.zeros(self.max_context, dtype=torch.long, device=dev)  # ids decoded this answer
            self.temperature = torch.ones(1, device=dev)
            self.top_p = torch.ones(1, device=dev)
            self.host = torch.zeros(self.max_context, dtype=torch.long, pin_memory=on_gpu)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.token_ids: list[int] = []  # tokens whose keys/values the cache holds, in order
        self.reused_tokens = 0  # prompt tokens the last answer took from the cache
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # greedy? -> captured step
        self.compile_seconds = 0.0
        self.captures = 0  # graph captures so far (warm_up only: never per request)
        if self.use_graphs:  # each decoder (one per load) compiles its own step; allow many loads
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._forward = torch.compile(self._forward_eager, fullgraph=True, dynamic=False) if self.use_graphs else self._forward_eager
        self._busy = threading.Lock()

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static KV cache (allocated in full up front)."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    # ----- steps ---------------------------------------------------------------------
    def _forward_eager(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] (fp32) of one token at `pos`; writes its keys/values at `pos`."""
        mask = (self.kv_positions <= pos).view(1, 1, 1, -1)  # stale entries past `pos` are invisible
        out = self.model(input_ids=token, position_ids=pos.view(1, 1), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Next token id [1], on the device: argmax, or temperature + top-p sampling."""
        if greedy:
            return logits.argmax(-1)
        sorted_logits, order = (logits / self.temperature).sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set of tokens whose mass reaches top_p (the first is always kept).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > self.top_p, 0.0)
        # argmax(p / Exp(1)) is a draw from p (normalization not needed), with no host sync.
        choice = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
        return order.gather(-1, choice).view(1)

    def _decode_step(self, greedy: bool) -> None:
        """One token: forward, sample, and advance every buffer, all on the device."""
        nxt = self._sample(self._forward(self.token, self.pos), greedy)
        self.out.index_copy_(0, self.step, nxt)
        self.token.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        self.step.add_(1)

    def _set_length(self, n: int) -> None:
        """Make the cache hold its first `n` tokens: the next write goes to position n."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(n)
        self.pos.fill_(n)

    def _prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run ids[start:] through the model in chunks (cache already holds ids[:start]); last logits."""
        self._set_length(start)
        logits = None
        for a in range(start, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[a:a + PREFILL_CHUNK]], dtype=torch.long, device=self.device)
            t = chunk.shape[1]
            positions = torch.arange(a, a + t, device=self.device)
            mask = (self.kv_positions[None, :] <= positions[:, None]).view(1, 1, t, -1)  # [1, 1, T, L]
            logits = self.model(input_ids=chunk, position_ids=positions.view(1, -1), attention_mask=mask,
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        self.pos.fill_(len(ids))
        return logits

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

    def warm_up(self) -> float:
        """Compile the step and capture its CUDA graphs (greedy and sampling); seconds taken.

        Call once per model load: requests only replay what this captured.
        """
        started = time.perf_counter()
        with self._busy, torch.inference_mode():
            n = min(8, self.max_context - 4)
            self._prefill(list(range(n)), 0)
            if self.use_graphs:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # compile and autotune off the capture stream
                    for greedy in (True, False):
                        for _ in range(2):
                            self._set_length(n)
                            self.step.zero_()
                            self._decode_step(greedy)
                torch.cuda.current_stream(self.device).wait_stream(side)
                pool = torch.cuda.graph_pool_handle()
                for greedy in (True, False):
                    self._set_length(n)
                    self.step.zero_()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        self._decode_step(greedy)
                    self.graphs[greedy] = graph
                    self.captures += 1
                torch.cuda.synchronize(self.device)
            else:
                self._decode_step(True)
            self._set_length(0)
            self.token_ids = []
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds

    # ----- one answer ----------------------------------------------------------------
    def _generate(self, input_ids: list[int], sampling: SamplingSettings, stop_event: threading.Event,
                  emit: Callable[[list[int]], None]) -> list[int]:
        """Prefill (reusing the cached prefix), then decode in chunks; returns the new ids."""
        greedy = sampling.temperature <= 0
        max_new = max(1, min(sampling.max_new_tokens, self.max_context - len(input_ids)))
        keep = min(common_prefix_length(self.token_ids, input_ids), len(input_ids) - 1)
        self.reused_tokens = max(0, keep)
        self.token_ids = []  # unknown until this answer is done
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if not greedy:
            self.temperature.fill_(sampling.temperature)
            self.top_p.fill_(sampling.top_p)
        step = self.graphs[greedy].replay if self.graphs else (lambda: self._decode_step(greedy))
        if 0 < len(input_ids) - self.reused_tokens <= self.replay_prefill_max:
            first = self._prefill_by_steps(input_ids, self.reused_tokens, step)
        else:
            first = self._sample(self._prefill(input_ids, self.reused_tokens), greedy)
        self.token.copy_(first.view(1, 1))
        new = [int(first.item())]  # the one sync before the first token is shown (TTFT)
        emit(new[:])
        finished = new[0] in self.eos_ids or max_new == 1 or stop_event.is_set()
        self.step.zero_()
        launched, pending = 0, deque()
        while not finished:
            # Keep two chunks in flight: the GPU never waits for the host reading the previous one.
            while launched < max_new - 1 and len(pending) < 2:
                n = min(self.chunk, max_new - 1 - launched)
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
            emit(ids)
            finished = finished or len(new) >= max_new or stop_event.is_set()
        for event, _, _ in pending:  # steps already queued: let them end before the lock is released
            if event is not None:
                event.synchronize()
        # The cache holds the prompt and every new token but the last (never fed back).
        self.token_ids = list(input_ids) + new[:-1]
        return new

    def stream(self, tokenizer, input_ids: list[int], sampling: SamplingSettings, stop_event: threading.Event,
               on_worker_done: Callable[[], None] | None = None) -> Iterator[StreamUpdate]:
        """Stream an answer like models.generation.stream_generate (same updates, stats, contract).

        Text updates are coalesced to one per STREAM_INTERVAL_S. `on_worker_done` runs in the
        worker thread when the GPU work has ended (the engine releases its lock there).
        """
        if len(input_ids) + 1 > self.max_context:  # cannot happen through the engine; stay correct anyway
            yield from stream_generate(self.model, tokenizer, input_ids, sampling, stop_event, None, on_worker_done)
            return
        out: queue.Queue = queue.Queue()
        stats = GenerationStats(prompt_tokens=len(input_ids))
        errors: list[BaseException] = []
        result: list[int] = []
        finals: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def run() -> None:
            try:
                with self._busy, torch.inference_mode():
                    result.extend(self._generate(input_ids, sampling, stop_event,
                                                 lambda ids: out.put((time.perf_counter(), ids))))
                    # Read while this answer still owns the decoder (and the GPU): once the lock
                    # is released, another session's answer may change both.
                    finals.update(reused=self.reused_tokens, peak=_device_peak(self.device))
            except BaseException as e:  # surfaced to the caller below, in its own thread
                self.token_ids = []  # the cache is in an unknown state
                errors.append(e)
            finally:
                out.put(_DONE)
                if on_worker_done is not None:
                    on_worker_done()

        started = time.perf_counter()
        worker = start_worker(run, "fast-decode", on_worker_done)
        decoder = IncrementalDecoder(tokenizer)
        text, shown, last_yield = "", 0, 0.0
        first_at = last_at = None
        new_ids: list[int] = []
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                at, ids = item
                first_at = first_at or at
                last_at = at
                new_ids.extend(ids)
                text += decoder.push(ids)
                stats.new_tokens = len(new_ids)
                stats.ttft_s = first_at - started
                stats.reused_tokens = self.reused_tokens
                now = time.perf_counter()
                if len(text) > shown and (shown == 0 or now - last_yield >= STREAM_INTERVAL_S):
                    shown, last_yield = len(text), now
                    yield StreamUpdate(text=text, stats=stats)
        finally:
            stop_event.set()  # the consumer went away, or we are done: stop the worker too
            worker.join()
        if errors:
            raise errors[0]
        text += decoder.flush()
        stats.total_s = time.perf_counter() - started
        stats.new_tokens = len(new_ids)
        stats.reused_tokens = finals.get("reused", 0)
        if first_at is not None:
            stats.ttft_s = first_at - started
            if stats.new_tokens > 1 and last_at > first_at:
                stats.decode_tokens_per_s = (stats.new_tokens - 1) / (last_at - first_at)
        if new_ids and new_ids[-1] in self.eos_ids:
            stats.finish_reason = "eos"
        elif stats.new_tokens >= sampling.max_new_tokens or len(input_ids) + stats.new_tokens >= self.max_context:
            stats.finish_reason = "length"
        else:
            stats.finish_reason = "stopped"
        stats.peak_bytes = finals.get("peak", 0)
        yield StreamUpdate(text=text, stats=stats, done=True, token_ids=list(new_ids))

    def stream_generate(self, model, tokenizer, input_ids: list[int], sampling: SamplingSettings,
                        stop_event: threading.Event, past_key_values=None,
                        on_worker_done: Callable[[], None] | None = None) -> Iterator[StreamUpdate]:
        """models.generation.stream_generate's signature; `model` and `past_key_values` are not
        used (this decoder owns its model and its static cache)."""
        return self.stream(tokenizer, input_ids, sampling, stop_event, on_worker_done)


def decoder_for(loaded) -> Callable[..., Iterator[StreamUpdate]]:
    """The streaming function for a loaded model: its FastDecoder if it has one, else stream_generate.

    Both take (model, tokenizer, input_ids, sampling, stop_event, past_key_values, on_worker_done).
    """
    fast = getattr(loaded, "fast", None)
    return fast.stream_generate if fast is not None else stream_generate
