"""Issue 12 (honest metrics, fairness): the GPU's queue serves in arrival order, lets a waiter give up
without releasing anything it does not hold, and tells a waiter its place, its wait and who holds the GPU.
Then the engine: answers say they wait, a Stop while waiting computes nothing, and TTFT counts the wait."""

import threading
import time

import pytest

from models import gpu_queue
from models.gpu_queue import GpuQueue, Work


def _arrive_in_order(queue: GpuQueue, n: int, served: list[int], hold_s: float = 0.002) -> list[threading.Thread]:
    """n threads that each join the line only after the previous one has, then record when they are served."""
    joined = [threading.Event() for _ in range(n)]

    def worker(i: int) -> None:
        ticket = queue.ticket(Work("answer"))
        joined[i].set()
        assert ticket.wait()
        served.append(i)
        time.sleep(hold_s)  # holding the GPU: every later thread is blocked, polling, contending
        ticket.release()

    threads = []
    for i in range(n):
        thread = threading.Thread(target=worker, args=(i,), daemon=True)
        thread.start()
        assert joined[i].wait(5)
        threads.append(thread)
    return threads


def test_many_threads_are_served_strictly_in_arrival_order():
    queue = GpuQueue()
    first = queue.ticket()
    assert first.wait(0)  # nobody held it: taken at once
    served: list[int] = []
    threads = _arrive_in_order(queue, 40, served)
    assert served == [] and queue.waiting_count() == 40
    first.release()
    for thread in threads:
        thread.join(10)
    assert served == list(range(40))
    assert not queue.locked() and queue.waiting_count() == 0


def test_a_plain_lock_user_cannot_jump_the_line():
    queue = GpuQueue()
    holder = queue.ticket()
    waiter = queue.ticket()
    assert holder.wait(0) and not waiter.wait(0)
    holder.release()
    # The GPU went straight to the waiter: a non-blocking grab (drop_session's) never takes it first.
    assert queue.locked() and not queue.acquire(blocking=False)
    assert waiter.wait(0)
    waiter.release()
    assert queue.acquire(blocking=False)  # free and nobody waiting: now it may
    queue.release()
    assert not queue.locked()


def test_giving_up_while_waiting_releases_nothing_and_the_next_waiter_proceeds():
    queue = GpuQueue()
    holder = queue.ticket(Work("answer"))
    assert holder.wait(0)
    stop = threading.Event()
    quitter = queue.ticket(Work("answer"), give_up=stop)
    patient = queue.ticket(Work("answer"))
    stop.set()  # Stop pressed while waiting
    assert quitter.wait(1) is False and quitter.state == "left"
    assert queue.locked() and queue.busy().work.kind == "answer"  # the holder still holds it
    assert holder.state == "holding" and patient.waiting().position == 1  # moved up
    quitter.release()  # a second give-up (the stream's finally) must not release the holder's turn
    assert holder.state == "holding" and queue.locked()
    holder.release()
    assert patient.wait(1) and patient.state == "holding"
    patient.release()
    assert not queue.locked()


def test_a_waiter_that_gave_up_without_asking_again_is_skipped():
    # The Stop event is set but its thread never comes back to the queue (a stream closed elsewhere).
    queue = GpuQueue()
    holder = queue.ticket()
    assert holder.wait(0)
    stop = threading.Event()
    gone = queue.ticket(give_up=stop)
    behind = queue.ticket()
    stop.set()
    holder.release()
    assert behind.wait(0) and gone.state == "left"
    behind.release()
    assert not queue.locked()


def test_a_turn_handed_over_just_as_its_waiter_gave_up_goes_to_the_next():
    queue = GpuQueue()
    holder = queue.ticket()
    assert holder.wait(0)
    stop = threading.Event()
    late = queue.ticket(give_up=stop)
    behind = queue.ticket()
    holder.release()  # the GPU goes to `late` ...
    assert late.state == "holding"
    stop.set()  # ... whose user pressed Stop before seeing it
    assert late.wait(0) is False and late.state == "left"
    assert behind.wait(0)
    behind.release()
    assert not queue.locked()


def test_release_from_another_thread_exactly_once():
    # An answer takes its turn in the caller's thread and its worker thread gives it back.
    queue = GpuQueue()
    ticket = queue.ticket()
    assert ticket.wait(0)
    behind = queue.ticket()
    worker = threading.Thread(target=ticket.release)
    worker.start()
    worker.join()
    assert behind.wait(1)
    ticket.release()  # the caller's own finally: a no-op, it must not take the GPU from `behind`
    assert behind.state == "holding" and queue.locked()
    behind.release()


def test_a_waiter_is_told_its_place_its_wait_and_who_holds_the_gpu():
    queue = GpuQueue()
    load = queue.ticket(Work.load("internlm2-chat-1.8b", "4bit"))
    assert load.wait(0)
    report = load.reporting(None)
    report(0.42, "Loading weights")
    a, b = queue.ticket(Work("answer")), queue.ticket(Work("answer"))
    time.sleep(0.3)
    where = b.waiting()
    assert (a.waiting().position, where.position) == (1, 2)
    assert 0.3 <= where.waited_s < 5
    assert where.busy.work == Work("load", "internlm2-chat-1.8b 4bit") and where.busy.progress == pytest.approx(0.42)
    english = where.message().render("en")
    assert english.startswith("Waiting for the model: position 2, 0.") or english.startswith("Waiting for the model: position 2, 1.")
    assert "another user's model is loading: internlm2-chat-1.8b 4bit, 42 %" in english
    assert "排第 2 位" in where.message().render("zh") and "42%" in where.message().render("zh")
    load.release()
    assert a.wait(0) and a.waiting().position == 0
    assert "answer is being written" in b.waiting().message().render("en")
    a.release()
    assert b.wait(0)
    waited = b.waited_s
    time.sleep(0.1)
    assert b.waited_s == waited  # frozen at its turn
    b.release()


def test_a_waiting_load_says_where_it_stands_through_its_progress():
    queue = GpuQueue()
    holder = queue.ticket(Work("answer"))
    assert holder.wait(0)
    said: list[tuple[float, str]] = []
    done = threading.Event()

    def load() -> None:
        with queue.turn(Work.load("m", "8bit"), lambda f, m: said.append((f, str(m))), every_s=0.1):
            done.set()

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(0.5)
    assert not done.is_set() and said and said[-1][0] == 0.0
    assert said[-1][1].startswith("Waiting for the model: position 1") and "answer is being written" in said[-1][1]
    holder.release()
    thread.join(5)
    assert done.is_set() and not queue.locked()


def test_a_timed_out_acquire_leaves_the_line():
    queue = GpuQueue()
    assert queue.acquire()
    assert queue.acquire(timeout=0.2) is False
    assert queue.waiting_count() == 0
    queue.release()
    with pytest.raises(RuntimeError):
        queue.release()


def test_an_abandoned_turn_passes_on(monkeypatch):
    # A stream dropped without being closed never comes back for the GPU it was handed.
    monkeypatch.setattr(gpu_queue, "ABANDONED_S", 0.3)
    queue = GpuQueue()
    holder = queue.ticket()
    assert holder.wait(0)
    dropped = queue.ticket()
    behind = queue.ticket()
    holder.release()
    assert dropped.state == "holding"
    assert behind.wait(3), "the next waiter should get the GPU once the abandoned turn is passed over"
    assert dropped.state == "left" and dropped.wait(0) is False
    behind.release()
    assert not queue.locked()


# ----- the engine's answers in the queue (a tiny random model) ------------------------------------

@pytest.fixture(scope="module")
def engine(catalog, tiny_llama):
    from models.engine import Engine
    from models.loading import LoadSettings

    engine = Engine(catalog)
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return engine


def _chat(engine, stop: threading.Event | None = None, tokens: int = 8):
    from models.generation import SamplingSettings

    return engine.chat([{"role": "user", "content": "Hello world"}], SamplingSettings(max_new_tokens=tokens, temperature=0),
                       stop or threading.Event())


def test_an_answer_says_it_waits_and_its_ttft_counts_the_wait(engine):
    assert engine._lock.acquire()  # another user's work holds the GPU
    updates = []
    thread = threading.Thread(target=lambda: updates.extend(_chat(engine)))
    thread.start()
    time.sleep(1.3)
    engine._lock.release()
    thread.join(30)
    waiting = [u for u in updates if u.waiting is not None]
    assert len(waiting) >= 2, "a waiting answer is refreshed about every 0.5 s"
    assert all(u.text == "" and not u.done and u.waiting.position == 1 for u in waiting)
    assert [u.waiting.waited_s for u in waiting] == sorted(u.waiting.waited_s for u in waiting)
    assert "Waiting for the model: position 1" in waiting[-1].waiting.message().render("en")
    final = updates[-1].stats
    assert updates[-1].done and updates[-1].waiting is None and final.new_tokens > 0
    assert 1.2 <= final.waited_s < 5
    assert final.ttft_s >= final.waited_s and final.turn_ttft_s == pytest.approx(final.ttft_s - final.waited_s)
    assert final.turn_ttft_s < 2  # the tiny model's prefill, not the wait
    assert "waited 1." in final.summary() and "after its turn" in final.summary()
    assert not engine._lock.locked()


def test_stop_while_waiting_computes_nothing_and_frees_the_place(engine):
    assert engine._lock.acquire()
    stop = threading.Event()
    updates = _chat(engine, stop)
    first = next(updates)
    assert first.waiting is not None and engine._lock.waiting_count() == 1
    stop.set()
    rest = list(updates)
    assert rest[-1].done and rest[-1].stats.finish_reason == "stopped" and rest[-1].stats.new_tokens == 0
    assert rest[-1].stats.waited_s > 0.4
    assert engine._lock.waiting_count() == 0 and engine._lock.locked()  # ours, still: nothing was released
    engine._lock.release()
    assert not engine._lock.locked()
    assert collect_done(_chat(engine)).stats.new_tokens > 0  # the next answer proceeds


def test_closing_a_waiting_answer_leaves_the_line(engine):
    assert engine._lock.acquire()
    updates = _chat(engine)
    assert next(updates).waiting is not None and engine._lock.waiting_count() == 1
    updates.close()  # the browser went away (Gradio closes the iterator)
    assert engine._lock.waiting_count() == 0
    engine._lock.release()
    assert not engine._lock.locked()


def test_an_answer_with_no_one_ahead_reports_no_wait(engine):
    final = collect_done(_chat(engine))
    assert final.stats.waited_s < 0.05 and "waited" not in final.stats.summary()
    assert final.stats.summary().startswith("TTFT ")


def collect_done(updates):
    updates = list(updates)
    assert updates and updates[-1].done
    return updates[-1]


# ----- the chat tab's handlers (tiny model): the wait in the answer's place, then in the metrics line ----

def test_the_chat_says_why_it_waits_then_shows_the_wait_in_its_metrics(engine):
    from ui.handlers import ChatHandlers, ChatSession

    handlers = ChatHandlers(engine)
    # Another user's load holds the GPU, 42 % done.
    other = engine._lock.ticket(Work.load("internlm2-chat-1.8b", "4bit"))
    assert other.wait(0)
    other.report(0.42)
    frames = []

    def answer(lang: str) -> None:
        history = [{"role": "user", "content": "Hello world"}]
        for frame in handlers.answer(history, "", 0, 0.9, 8, ChatSession(), lang):
            frames.append((lang, [dict(m, metadata=dict(m.get("metadata") or {})) for m in frame]))

    threads = [threading.Thread(target=answer, args=(lang,)) for lang in ("en", "zh")]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # "en" arrives first
    time.sleep(1.2)
    other.release()
    for thread in threads:
        thread.join(30)
    # While waiting, the answer's place holds a pending UI-only line (never sent to the model).
    waiting = {lang: [f[-1]["metadata"]["title"] for lg, f in frames if lg == lang and _pending(f[-1])]
               for lang in ("en", "zh")}
    assert "Waiting for the model: position 1," in waiting["en"][0]
    assert "another user's model is loading: internlm2-chat-1.8b 4bit, 42 %" in waiting["en"][0]
    assert "排第 2 位" in waiting["zh"][0] and "另一位用户的模型正在加载：internlm2-chat-1.8b 4bit，42%" in waiting["zh"][0]
    final = [f for lg, f in frames if lg == "en"][-1]
    assert final[1]["role"] == "assistant" and final[1]["content"] and not final[1]["metadata"]
    metrics = final[2]["metadata"]["title"]
    assert metrics.startswith("waited 1.") and "TTFT" in metrics and "s after its turn)" in metrics, metrics
    zh = [f for lg, f in frames if lg == "zh"][-1][2]["metadata"]["title"]
    assert zh.startswith("排队 ") and "轮到后" in zh, zh
    assert not engine._lock.locked()


def _pending(message: dict) -> bool:
    return (message.get("metadata") or {}).get("status") == "pending"


def test_a_load_waiting_for_its_turn_says_so_in_its_progress(engine, tiny_llama):
    from models.loading import LoadSettings

    holder = engine._lock.ticket(Work("answer"))
    assert holder.wait(0)
    said = []
    thread = threading.Thread(target=lambda: engine.ensure(str(tiny_llama), LoadSettings(context_tokens=512),
                                                           progress=lambda f, m: said.append((f, str(m)))))
    thread.start()
    time.sleep(1.2)
    assert said and said[0] == (0.0, said[0][1]) and said[0][1].startswith("Waiting for the model: position 1")
    assert "answer is being written" in said[0][1]
    holder.release()
    thread.join(30)
    assert not engine._lock.locked()


def test_a_comparison_side_waiting_for_the_gpu_says_so(engine, tiny_llama):
    from compare.runner import ConfigSpec, compare
    from models.generation import SamplingSettings
    from models.loading import LoadSettings

    states = compare(engine, [ConfigSpec(str(tiny_llama))], [{"role": "user", "content": "Hello world"}],
                     SamplingSettings(max_new_tokens=4, temperature=0), base=LoadSettings(context_tokens=512))
    queued, holding = [], False
    for state in states:
        side = state.sides[0]
        if side.status == "streaming" and not queued and side.queued is None:
            assert engine._lock.acquire()  # another user's answer starts before this side's
            holding = True
        if side.queued is not None:
            queued.append(side.queued.render("en"))
            if holding and len(queued) >= 2:
                engine._lock.release()
                holding = False
    assert queued and queued[0].startswith("Waiting for the model: position 1")
    assert side.status == "done" and side.queued is None and side.text
    assert not engine._lock.locked()
