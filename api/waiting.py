"""The API's bounded wait queue: one API request at a time goes to the engine, a few wait, more are refused.

The engine's lock already serializes every answer (UI and API). This queue in front of it
adds what the lock cannot: a bound on how many API requests wait (503 + Retry-After beyond
it), first come first served among API clients, and a wait that a client who went away
can leave (a thread blocked on the engine's lock cannot be called back).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque


class QueueFull(Exception):
    """Too many requests are waiting; `retry_after_s` is a guess of when a place frees up."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class Ticket:
    """A request's place in the queue: wait() for its turn, then release() when done."""

    def __init__(self, queue: "WaitQueue"):
        self._queue = queue
        self._started: float | None = None
        self._done = False

    def wait(self, give_up: threading.Event, poll_s: float = 0.05) -> bool:
        """Block until this is the first in line (True), or until `give_up` is set (False, place left)."""
        q = self._queue
        with q._cond:
            while q._line[0] is not self:
                if give_up.is_set():
                    self._leave_locked()
                    return False
                q._cond.wait(poll_s)
            self._started = time.monotonic()
            return True

    def release(self) -> None:
        """Leave the queue (after the answer, or without ever running); safe to call twice."""
        with self._queue._cond:
            self._leave_locked()

    def _leave_locked(self) -> None:
        q = self._queue
        if self._done:
            return
        self._done = True
        q._line.remove(self)
        if self._started is not None:  # a running average of answer times, for Retry-After
            seconds = time.monotonic() - self._started
            q._mean_s = seconds if q._mean_s is None else 0.8 * q._mean_s + 0.2 * seconds
        q._cond.notify_all()


class WaitQueue:
    """First come, first served; at most `max_waiting` requests wait behind the one running."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._line: deque[Ticket] = deque()  # the first one runs (or is about to)
        self._mean_s: float | None = None

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet first in line."""
        with self._cond:
            return max(0, len(self._line) - 1)

    def admit(self) -> Ticket:
        """A place in line, or QueueFull (the caller answers 503 with Retry-After)."""
        with self._cond:
            if len(self._line) > self.max_waiting:
                # Everyone ahead must finish first; unknown answer time: guess a few seconds each.
                per = self._mean_s if self._mean_s is not None else 5.0
                retry = max(1, min(300, math.ceil(per * len(self._line))))
                raise QueueFull(len(self._line) - 1, retry)
            ticket = Ticket(self)
            self._line.append(ticket)
            return ticket
