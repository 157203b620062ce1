"""Stop strings in a streamed answer: cut at the first one, and never stream part of one."""

from __future__ import annotations


class StopScanner:
    """Fed the growing answer text; hands out only text that can no longer turn into a stop string.

    While the answer ends in what could be the start of a stop string ("Para" for "Paris"),
    that tail is held back; if the stop string completes, it is never sent.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.sent = 0  # characters of the answer handed out so far
        self.hit = False  # a stop string was found: the answer ends before it

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, text: str, final: bool = False) -> str:
        """The new text to send, given the whole answer so far (`final`: nothing more will come)."""
        if self.hit:
            return ""
        # Search only where a stop string could start that was not fully visible before.
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            end, self.hit = min(cuts), True
        else:
            end = len(text) if final else len(text) - self._held_back(text)
        end = max(end, self.sent)
        delta, self.sent = text[self.sent:end], end
        return delta
