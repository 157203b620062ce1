"""The API's admission bound: at most one running and `max_waiting` waiting API requests; more are refused.

Order is not kept here: every admitted request goes straight to the engine, whose GPU queue serves
all work (browser tabs, API requests, comparisons, loads) in arrival order. A second line in front
of it would put every API client behind the one API request in the engine, while each browser tab
has its own place there: that is how the API was starved (BENCHMARKS.md, "Soak"). What this adds
is the bound: beyond it a client gets 503 with a Retry-After instead of an unbounded wait.
"""

from __future__ import annotations

import math
import threading
import time


class QueueFull(Exception):
    """Too many requests are waiting; `retry_after_s` is a guess of when a place frees up."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class Ticket:
    """An admitted request's place: release() when it is done (or never ran); safe to call twice."""

    def __init__(self, queue: "WaitQueue"):
        self._queue = queue
        self._admitted = time.monotonic()
        self._done = False

    def release(self) -> None:
        """Give the place back."""
        q = self._queue
        with q._lock:
            if self._done:
                return
            self._done = True
            q._in_flight -= 1
            # A running average of a request's whole time (its wait included), for Retry-After.
            seconds = time.monotonic() - self._admitted
            q._mean_s = seconds if q._mean_s is None else 0.8 * q._mean_s + 0.2 * seconds


class WaitQueue:
    """Admits up to 1 + `max_waiting` API requests at a time into the engine."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_s: float | None = None

    @property
    def waiting(self) -> int:
        """Requests admitted beyond the one that may be answering."""
        with self._lock:
            return max(0, self._in_flight - 1)

    def admit(self) -> Ticket:
        """A place, or QueueFull (the caller answers 503 with Retry-After)."""
        with self._lock:
            if self._in_flight > self.max_waiting:
                # A place frees when the oldest admitted request ends: at most about one request's whole
                # time; unknown before the first one ended: guess a few seconds per request ahead.
                guess = self._mean_s if self._mean_s is not None else 5.0 * self._in_flight
                raise QueueFull(self._in_flight - 1, max(1, min(300, math.ceil(guess))))
            self._in_flight += 1
            return Ticket(self)
