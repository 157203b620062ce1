"""The GPU's fair queue: one holder at a time, everyone else served strictly in the order they arrived.

A plain threading.Lock is not fair: whoever grabs it first after a release wins, and in the 10-minute
soak (BENCHMARKS.md) the API clients, whose requests reached the lock later, waited 218 s at p50
while browser tabs kept being served. Here every piece of GPU work (an answer, a load, an unload, a
comparison's quality check) takes a Ticket; a release hands the GPU to the oldest waiting ticket.

A waiting ticket knows its place (how many are ahead), how long it has waited and what holds the
GPU now ("answering", "loading internlm2-chat-1.8b 4bit, 42 %"), so a waiting user can be told why.
A waiter may give up (Stop pressed, client gone): it leaves the line and releases nothing, and the
one behind it moves up. The holder's release may come from another thread than the one that waited
(an answer's worker thread gives the GPU back when its computation ends), exactly once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .messages import Message

# A ticket handed the GPU whose waiter has not come back for it in this long was abandoned (its
# stream dropped without being closed): the GPU passes on rather than waiting for it for ever.
ABANDONED_S = 30.0
_POLL_S = 0.25  # how often a blocked waiter looks for an abandoned holder
Progress = Callable[[float, "str | Message"], None]  # a load's progress: fraction, what it is doing


@dataclass(frozen=True)
class Work:
    """What a turn on the GPU does: 'answer' | 'load' | 'unload' | 'check' | 'other', and which model."""

    kind: str = "other"
    model: str = ""  # "internlm2-chat-1.8b 4bit" for a load

    @classmethod
    def load(cls, model: str, quant: str) -> "Work":
        """Loading a model, named as a waiting user will read it."""
        return cls("load", f"{model} {quant}")


@dataclass(frozen=True)
class Busy:
    """What holds the GPU now, for those waiting: its work, how far (a load's 0..1, else None), since when."""

    work: Work
    progress: float | None
    held_s: float

    def reason(self) -> Message:
        """Why the GPU is busy, as a sentence part ("another user's model is loading: X, 42 %")."""
        if self.work.kind == "load":
            percent = f"{100 * (self.progress or 0.0):.0f}"
            return Message("gpu_busy_load", {"model": self.work.model, "percent": percent})
        return Message(f"gpu_busy_{self.work.kind if self.work.kind in ('answer', 'unload', 'check') else 'other'}")


@dataclass(frozen=True)
class Waiting:
    """A waiting ticket's place: `position` 1 is next after the holder; the seconds waited; who holds the GPU."""

    position: int
    waited_s: float
    busy: Busy | None  # None in the instant between a release and the next holder taking over

    def message(self) -> Message:
        """'Waiting for the model: position 2, 3.4 s (another user's answer is being written).'"""
        why = self.busy.reason() if self.busy is not None else Message("gpu_busy_other")
        return Message("gpu_waiting", {"position": self.position, "waited": f"{self.waited_s:.1f}", "why": why})


class Ticket:
    """One piece of GPU work's place in line: wait() for the GPU, then release() it (from any thread, once)."""

    def __init__(self, queue: "GpuQueue", work: Work, give_up: threading.Event | None):
        self._queue = queue
        self.work = work
        self.give_up = give_up  # set: the waiter left (Stop, client gone); the queue skips it
        self.arrived = time.monotonic()
        self.granted: float | None = None  # when it was handed the GPU
        self.progress: float | None = None
        self._seen = self.arrived  # last time its waiter asked (an abandoned waiter stops asking)
        self._claimed = False  # its waiter has seen that it holds the GPU
        self.state = "waiting"  # "waiting" -> "holding" -> "released", or "waiting" -> "left"

    @property
    def waited_s(self) -> float:
        """Seconds from arrival to the GPU (to now while still waiting)."""
        return (self.granted if self.granted is not None else time.monotonic()) - self.arrived

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this ticket holds the GPU (True), `timeout` passes (False) or `give_up` is set (False, left).

        After False, `state` says which: still "waiting" (ask again) or "left" (gave up, holds nothing).
        """
        q = self._queue
        end = None if timeout is None else time.monotonic() + timeout
        with q._cond:
            while True:
                self._seen = time.monotonic()
                gave_up = self.give_up is not None and self.give_up.is_set()
                if self.state == "holding" and gave_up and not self._claimed:
                    self.state = "left"  # handed the GPU just as its waiter left: it goes to the next one
                    q._holder = None
                    q._hand_on_locked()
                    return False
                if self.state == "holding":
                    self._claimed = True
                    return True
                if self.state != "waiting":
                    return False
                if gave_up:
                    q._leave_locked(self)
                    return False
                q._pass_on_abandoned_locked()
                left = _POLL_S if end is None else min(_POLL_S, end - time.monotonic())
                if left <= 0:
                    return False
                q._cond.wait(left)

    def waiting(self) -> Waiting:
        """Its place in line now (position 0 once it holds the GPU)."""
        q = self._queue
        with q._cond:
            position = q._line.index(self) + 1 if self in q._line else 0
            return Waiting(position, self.waited_s, q._busy_locked())

    def report(self, fraction: float) -> None:
        """How far the holder's work is (a load's progress), for those waiting behind it."""
        self.progress = max(0.0, min(1.0, fraction))

    def reporting(self, progress: Progress | None) -> Progress:
        """`progress` (may be None) that also tells those waiting behind how far this work is."""
        def report(fraction: float, message) -> None:
            self.report(fraction)
            if progress is not None:
                progress(fraction, message)
        return report

    @contextmanager
    def doing(self, work: Work) -> Iterator["Ticket"]:
        """The holder does `work` for a while within its turn (an answer first loading its session's model):
        those waiting read that, and its progress, instead of the turn's own work."""
        with self._queue._cond:
            before, self.work, self.progress = self.work, work, None
        try:
            yield self
        finally:
            with self._queue._cond:
                self.work, self.progress = before, None

    def release(self) -> None:
        """Give the GPU to the next in line (or leave the line, if still waiting); later calls do nothing."""
        q = self._queue
        with q._cond:
            if self.state == "holding":
                q._hand_on_locked()
            elif self.state == "waiting":
                q._leave_locked(self)


class GpuQueue:
    """A fair lock for the GPU: tickets hold it one at a time, in arrival order; also usable as a plain lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()  # waiting tickets, oldest first
        self._holder: Ticket | None = None

    def ticket(self, work: Work = Work(), give_up: threading.Event | None = None) -> Ticket:
        """Join the line now (the GPU is taken at once when nobody holds it or waits)."""
        with self._cond:
            ticket = Ticket(self, work, give_up)
            self._line.append(ticket)
            if self._holder is None:
                self._hand_on_locked()
            return ticket

    @contextmanager
    def turn(self, work: Work = Work(), progress: Progress | None = None, every_s: float = 0.5) -> Iterator[Ticket]:
        """Hold the GPU for a block, in turn; while waiting, `progress(0, message)` says the place in line every `every_s`."""
        ticket = self.ticket(work)
        try:
            while not ticket.wait(every_s):
                if progress is not None:
                    progress(0.0, ticket.waiting().message())
            yield ticket
        finally:
            ticket.release()

    def busy(self) -> Busy | None:
        """What holds the GPU now, or None when it is free."""
        with self._cond:
            return self._busy_locked()

    def waiting_count(self) -> int:
        """Tickets waiting behind the holder."""
        with self._cond:
            return len(self._line)

    # ----- as a plain lock (with, acquire/release/locked): for code and tests that need no place in line
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the GPU in turn; without blocking, only when nobody holds it or waits (never jumps the line)."""
        if not blocking:
            with self._cond:
                if self._holder is not None or self._line:
                    return False
                return self.ticket().wait(0)
        ticket = self.ticket()
        if ticket.wait(None if timeout is None or timeout < 0 else timeout):
            return True
        ticket.release()  # timed out: leave the line (or, if the GPU came just now, pass it on)
        return False

    def release(self) -> None:
        """Release the GPU, whoever took it (as threading.Lock.release); RuntimeError if it is free."""
        with self._cond:
            if self._holder is None:
                raise RuntimeError("release of a free GPU queue")
            self._hand_on_locked()

    def locked(self) -> bool:
        """Someone holds the GPU."""
        with self._cond:
            return self._holder is not None

    def __enter__(self) -> "GpuQueue":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ----- inside the condition ------------------------------------------------------
    def _busy_locked(self) -> Busy | None:
        h = self._holder
        if h is None:
            return None
        return Busy(h.work, h.progress, time.monotonic() - (h.granted or h.arrived))

    def _hand_on_locked(self) -> None:
        """The holder (if any) is done: the oldest ticket that has not given up takes the GPU."""
        if self._holder is not None:
            self._holder.state = "released"
            self._holder = None
        while self._line:
            ticket = self._line.popleft()
            if ticket.give_up is not None and ticket.give_up.is_set():
                ticket.state = "left"  # gave up while nobody was asking for it: skipped, holds nothing
                continue
            ticket.state, ticket.granted = "holding", time.monotonic()
            self._holder = ticket
            break
        self._cond.notify_all()

    def _leave_locked(self, ticket: Ticket) -> None:
        if ticket.state == "waiting":
            ticket.state = "left"
            self._line.remove(ticket)
            self._cond.notify_all()

    def _pass_on_abandoned_locked(self) -> None:
        """A holder whose waiter never came back for it (a dropped stream) is passed over."""
        h = self._holder
        if h is not None and not h._claimed and time.monotonic() - h._seen > ABANDONED_S:
            h.state = "left"
            self._holder = None
            self._hand_on_locked()
