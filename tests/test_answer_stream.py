"""The one answer shell both local decoders stream through (models/answer_stream.py): finish
reasons, Stop and early close, the lock hand-back exactly once, errors, coalesced updates, and
facts the decoder notes. The plain and fast decoders' own tests check they give generate()'s
tokens through it."""

import threading
import time

import pytest
import torch

from models.answer_stream import AnswerJob, TokenSink, stream_answer

CPU = torch.device("cpu")
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def job(produce, max_new=10, context_limit=None, interval=0.0, eos=frozenset({EOS})) -> AnswerJob:
    return AnswerJob(produce=produce, device=CPU, prompt_tokens=5, max_new_tokens=max_new, eos_ids=eos,
                     context_limit=context_limit, min_interval_s=interval)


def emitting(ids: list[int], note: dict | None = None, stop: threading.Event | None = None, delay: float = 0.0):
    def produce(sink: TokenSink) -> None:
        if note:
            sink.note(**note)
        for token in ids:
            if stop is not None and stop.is_set():
                return
            sink.tokens([token])
            time.sleep(delay)
    return produce


@pytest.mark.parametrize("ids, max_new, limit, reason", [
    ([5, 6, EOS], 10, None, "eos"),
    ([5, 6, 7], 3, None, "length"),
    ([5, 6, 7], 10, 8, "length"),  # prompt 5 + 3 new reach the context
    ([5, 6], 10, None, "stopped"),
])
def test_finish_reasons(tokenizer, ids, max_new, limit, reason):
    final = list(stream_answer(job(emitting(ids), max_new, limit), tokenizer, threading.Event()))[-1]
    assert final.done and final.token_ids == ids and final.stats.finish_reason == reason
    assert final.stats.new_tokens == len(ids) and final.stats.prompt_tokens == 5
    assert final.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stats_time_the_tokens_and_carry_what_the_decoder_noted(tokenizer):
    updates = list(stream_answer(job(emitting([5, 6, 7, 8], note={"reused_tokens": 3, "peak_bytes": 1234}, delay=0.02)),
                                 tokenizer, threading.Event()))
    final = updates[-1]
    assert final.stats.reused_tokens == 3 and final.stats.peak_bytes == 1234
    assert 0 < final.stats.ttft_s < final.stats.total_s
    assert 20 < final.stats.decode_tokens_per_s < 60  # 3 tokens after the first, ~20 ms apart
    assert final.stats.process_rss_bytes > 0  # on a CPU the whole process's RSS, shown as what it is
    assert all(u.stats.reused_tokens == 3 for u in updates)  # noted before the first token


def test_updates_are_coalesced_to_the_interval_and_the_final_text_is_whole(tokenizer):
    ids = list(range(5, 45))
    updates = list(stream_answer(job(emitting(ids, delay=0.005), max_new=100, interval=0.05), tokenizer,
                                 threading.Event()))
    assert 2 <= len(updates) <= 12  # ~0.2 s of tokens at most one text update per 50 ms (+ first + final)
    assert updates[-1].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_closing_early_stops_the_worker_and_hands_the_lock_back_once(tokenizer):
    stop, released = threading.Event(), []
    stream = stream_answer(job(emitting(list(range(5, 500)), stop=stop, delay=0.01), max_new=1000), tokenizer, stop,
                           on_worker_done=lambda: released.append(threading.current_thread().name))
    next(stream)
    stream.close()  # the browser went away
    assert stop.is_set() and released == ["answer"]  # in the worker thread, exactly once
    assert not any(t.name == "answer" for t in threading.enumerate())


def test_a_failing_decoder_raises_in_the_caller_and_still_hands_the_lock_back(tokenizer):
    released = []

    def broken(sink: TokenSink) -> None:
        sink.tokens([5])
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        list(stream_answer(job(broken), tokenizer, threading.Event(), on_worker_done=lambda: released.append(1)))
    assert released == [1]
