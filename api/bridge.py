"""A blocking answer (an iterator run in its own thread) consumed from the web server's event loop.

The engine streams from a worker thread and blocks on its lock and its token queue; the
server must never block its event loop on that. Items cross over through an asyncio.Queue.
Cancelling sets the stop event: the answer (or its wait in line) ends at the next token, and
the thread still drains the engine's iterator, so the engine's lock is always given back.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterator

_END = object()


class ThreadedStream:
    """Runs `produce(stop_event)` in a daemon thread; `await next()` returns its items, then raises StopAsyncIteration."""

    def __init__(self, produce: Callable[[threading.Event], Iterator], name: str = "api-answer"):
        self.stop_event = threading.Event()
        self._produce = produce
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self.finished = threading.Event()  # the thread has ended (the engine let go of everything)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass

    def _run(self) -> None:
        try:
            for item in self._produce(self.stop_event):
                self._post(item)
        except BaseException as e:  # handed to the consumer, which maps it to an HTTP error
            self._post(e)
        finally:
            self._post(_END)
            self.finished.set()

    async def next(self, timeout: float | None = None):
        """The next item; raises what the producer raised; asyncio.TimeoutError after `timeout` seconds."""
        item = await asyncio.wait_for(self._items.get(), timeout)
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        """Stop the answer (the client went away): computation ends at the next token."""
        self.stop_event.set()
