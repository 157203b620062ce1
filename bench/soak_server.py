"""The app as `app.py` serves it, plus one JSON line per answer for bench/soak.py to read.

    python bench/soak_server.py TIMINGS.jsonl -- --api --port 7860 --temperature 0 ...

The only addition is a pass-through wrapper around Engine.chat (it changes no answer): when an
answer ends it writes how long the request waited for the GPU (the engine's queue), the engine's
TTFT from the send and after its turn, tokens, decode speed, the answer's text, the process RSS
and the engine's KV-cache bytes at that moment. Everything else is app.main with the given arguments.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record_answers(path: Path) -> None:
    """Wrap Engine.chat so each finished answer appends one JSON line to `path`."""
    import psutil

    from models.engine import Engine

    inner = Engine.chat
    process = psutil.Process()
    out = path.open("a", buffering=1)
    lock = threading.Lock()  # answers end in several threads: one whole line at a time

    def chat(self, messages, sampling, stop_event, *args, **kwargs):
        updates = inner(self, messages, sampling, stop_event, *args, **kwargs)
        try:
            for update in updates:
                if update.done:
                    s = update.stats
                    line = {
                        "ended": time.time(), "session": kwargs.get("session"),
                        "last_user": next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""),
                        # The engine's own figures: the send to its turn on the GPU (other users' work), TTFT from
                        # the send (the wait included) and after its turn (templating, prefill).
                        "wait_s": s.waited_s, "ttft_s": s.ttft_s, "turn_ttft_s": s.turn_ttft_s, "total_s": s.total_s,
                        "new_tokens": s.new_tokens, "decode_tok_s": s.decode_tokens_per_s,
                        "finish": s.finish_reason, "reused": s.reused_tokens, "text": update.text,
                        "rss": process.memory_info().rss,
                        # The engine's own count of KV-cache bytes: RSS growth beyond it is not caches.
                        "kv_bytes": self.kv_cache_bytes(), "kv_sessions": self.session_count(),
                    }
                    with lock:
                        out.write(json.dumps(line) + "\n")
                yield update
        finally:
            updates.close()  # a caller that left stops the engine's answer, as without the wrapper

    Engine.chat = chat


def main() -> int:
    """Record answers into argv[1], then run the app with the arguments after '--'."""
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    record_answers(Path(argv[0]))
    import app

    return app.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main())
