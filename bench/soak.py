"""Soak: many concurrent chat sessions against one real server, checked for cross-talk and leaks.

    python bench/soak.py                                  # 16 sessions, 10 minutes (BENCHMARKS.md)
    python bench/soak.py --sessions 8 --minutes 1.5 --browsers 2 --gradio 2 --out /tmp/soak.json

The server is the real app (`app.py --api`, embedded model, greedy) in its own process,
started through bench/soak_server.py, which only adds one JSON line per finished answer
(wait, engine TTFT, tokens, text, RSS). Sessions are real clients, mixed: Chromium pages
(Playwright) typing into the chat, the `openai` client streaming from /v1, and gradio_client
calling /answer. Every session repeats a conversation: it tells a unique secret, asks an
unrelated question, then asks for the secret back.

Checked: the server never dies or logs a traceback; every turn gets a complete answer (the
client's text is the text the engine finished with); no answer or history ever holds a secret
of another conversation; each history holds exactly its own turns; RSS per answer is flat.
Measured: recall rate (the 135M model is weak: this is about the model, not the app), the wait
for the engine, TTFT from the engine's start and from the user's send, throughput. Per client kind:
the wait and TTFT the app reported to the client (the metrics line; the API's `smallchat` figures)
and the TTFT the client itself saw from its send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TELL = "The secret code is {secret}. Reply with only the code."
ASK = "What is the secret code? Reply with only the code."
FILLERS = ["What is the capital of France?", "Name a primary color.", "What is 2 plus 2?",
           "Say hello in French.", "What do bees make?"]
WORDS = ["Kiwi", "Mango", "Plum", "Lemon", "Olive", "Peach", "Cherry", "Melon", "Lime", "Fig", "Pear", "Grape"]
# The chat's metrics line: "[waited 3.2 s · ]TTFT 3.40 s[ (0.20 s after its turn)] · 12.3 tok/s · 57 tokens".
METRICS = re.compile(r"(?:waited ([\d.]+) s · )?TTFT ([\d.]+) s(?: \(([\d.]+) s after its turn\))? · ([\d.–]+) tok/s · "
                     r"(\d+) tokens")


@dataclass
class Turn:
    """One question and what the client saw of its answer."""

    session: str
    kind: str
    question: str
    answer: str = ""
    sent: float = 0.0  # wall clock (time.time) when the client sent it
    first: float | None = None  # when the client saw the first answer text
    done: float | None = None
    tokens: int = 0
    error: str = ""
    conversation: int = 0  # index into its session's secrets
    waited_s: float | None = None  # the wait for the GPU the app reported to this client
    ttft_s: float | None = None  # the TTFT from the send the app reported (the wait included)


@dataclass
class Session:
    """A client and its conversations; secrets[i] belongs to conversation i."""

    name: str
    kind: str  # "browser" | "openai" | "gradio"
    secrets: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    recalls: list[bool] = field(default_factory=list)
    history_errors: list[str] = field(default_factory=list)
    shown: list[tuple[int, str]] = field(default_factory=list)  # (conversation, text of its final history)


def normalized(text: str) -> str:
    """Letters and digits only: what survives Markdown rendering in the browser."""
    return re.sub(r"[\W_]+", "", text).lower()


class Secrets:
    """Unique secrets across the whole run, so any one of them found elsewhere is cross-talk."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.used: set[str] = set()

    def new(self) -> str:
        """A secret no conversation of this run has had."""
        while True:
            secret = f"{self.rng.choice(WORDS)}-{self.rng.randint(1000, 9999)}"
            if secret not in self.used:
                self.used.add(secret)
                return secret


# ----- clients --------------------------------------------------------------------------

async def openai_turn(client, session: Session, messages: list[dict], question: str) -> Turn:
    """One streamed turn through the official openai client."""
    turn = Turn(session.name, session.kind, question, sent=time.time())
    messages.append({"role": "user", "content": question})
    finish = None
    try:
        stream = await client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta.content or ""
                if delta and turn.first is None:
                    turn.first = time.time()
                turn.answer += delta
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                turn.tokens = chunk.usage.completion_tokens
            figures = (chunk.model_extra or {}).get("smallchat")
            if figures:  # on the chunk that finishes the answer
                turn.waited_s, turn.ttft_s = figures["waited_s"], figures["ttft_s"]
        turn.done = time.time()
        if finish not in ("stop", "length"):
            turn.error = f"stream ended without a finish reason ({finish!r})"
    except Exception as e:  # a soak counts failures instead of stopping at the first
        turn.error = f"{type(e).__name__}: {e}"
    messages.append({"role": "assistant", "content": turn.answer})
    return turn


def gradio_turn(client, session: Session, history: list[dict], question: str) -> tuple[Turn, list[dict]]:
    """One turn through gradio_client's /answer (history in, history answered out), streamed."""
    turn = Turn(session.name, session.kind, question, sent=time.time())
    sent = history + [{"role": "user", "content": question}]
    out = None
    try:
        job = client.submit(sent, api_name="/answer")
        for partial in job:
            out = partial
            if turn.first is None and _answer_of(partial):
                turn.first = time.time()
        out = job.result()
        turn.done = time.time()
        turn.answer = _answer_of(out)
        metrics = [m for m in out if METRICS.search((m.get("metadata") or {}).get("title", ""))]
        if metrics:
            reported(turn, METRICS.search(metrics[-1]["metadata"]["title"]))
        else:
            turn.error = "no metrics line after the answer"
    except Exception as e:
        turn.error = f"{type(e).__name__}: {e}"
    return turn, (out if isinstance(out, list) else sent)


def reported(turn: Turn, metrics: re.Match) -> None:
    """What the chat's metrics line told the user: tokens, the wait (none shown: under 0.05 s) and TTFT."""
    turn.tokens = int(metrics.group(5))
    turn.waited_s = float(metrics.group(1) or 0.0)
    turn.ttft_s = float(metrics.group(2))


def _answer_of(history) -> str:
    """The text of the last answer (not a UI-only line) in a Gradio history."""
    if not isinstance(history, list):
        return ""
    for m in reversed(history):
        if m.get("role") == "assistant" and not m.get("metadata"):
            return _text(m.get("content"))
        if m.get("role") == "user":
            return ""
    return ""


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text") or "")
    return "" if content is None else str(content)


# The chat as the page shows it: [kind, is a UI-only line, text] for each message, in order. A UI-only
# line is drawn as a collapsible "thought" (the one still pending, "Waiting for the model…", too).
DOM_MESSAGES = """() => [...document.querySelectorAll('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')]
  .map(d => [d.dataset.testid, !!(d.closest('.thought') || d.querySelector('.thought-group')), d.innerText.trim()])"""
METRIC_COUNT = "(document.querySelector('#chatbot').innerText.match(/TTFT/g) || []).length"


async def browser_turn(page, session: Session, question: str, answered: int) -> Turn:
    """Type a question into the page and wait for its answer and metrics line."""
    turn = Turn(session.name, session.kind, question)
    try:
        await page.fill("#message textarea", question)
        turn.sent = time.time()
        await page.press("#message textarea", "Enter")
        # The answer bubble after the question (a bot message that is not a metrics line) has text.
        await page.wait_for_function(
            f"""() => {{ const m = ({DOM_MESSAGES})(); const a = m.filter(x => x[0] === 'bot' && !x[1]);
                 return a.length > {answered} && a[a.length - 1][2].length > 0; }}""", polling=100, timeout=600_000)
        turn.first = time.time()
        await page.wait_for_function(f"{METRIC_COUNT} > {answered}", polling=100, timeout=600_000)
        turn.done = time.time()
        messages = await page.evaluate(DOM_MESSAGES)
        answers = [m[2] for m in messages if m[0] == "bot" and not m[1]]
        notes = [m[2] for m in messages if m[0] == "bot" and m[1]]
        turn.answer = answers[-1] if answers else ""
        found = METRICS.search(notes[-1]) if notes else None
        if found:
            reported(turn, found)
        else:
            turn.error = f"no metrics line after the answer: {notes[-1:]}"
    except Exception as e:
        turn.error = f"{type(e).__name__}: {str(e)[:300]}"
    return turn


async def clear_chat(page) -> None:
    """Press Clear until the chat is empty (pressed the instant an answer's last line shows, it may still refuse)."""
    for _ in range(20):
        await page.click("#clear")
        try:
            await page.wait_for_function(f"({DOM_MESSAGES})().length === 0", polling=100, timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - refused ("still being written"): press again
            continue
    raise RuntimeError("Clear did not empty the chat")


def check_history(session: Session, shown: list[tuple[str, str]], asked: list[str], answers: list[str]) -> None:
    """A history must be exactly this conversation: its questions in order, one answer each."""
    questions = [text for role, text in shown if role == "user"]
    replies = [text for role, text in shown if role == "assistant"]
    if questions != asked:
        session.history_errors.append(f"questions {questions!r} != sent {asked!r}")
    if len(replies) != len(answers) or [normalized(r) for r in replies] != [normalized(a) for a in answers]:
        session.history_errors.append(f"answers {replies!r} != received {answers!r}")


async def run_session(session: Session, kind_client, secrets: Secrets, deadline: float, think_s: float,
                      rng: random.Random) -> None:
    """Conversations until the deadline: tell a secret, ask a filler question, ask for the secret."""
    page = kind_client if session.kind == "browser" else None
    while time.time() < deadline:
        secret = secrets.new()
        session.secrets.append(secret)
        questions = [TELL.format(secret=secret), rng.choice(FILLERS), ASK]
        messages: list[dict] = []  # the openai client's conversation
        history: list[dict] = []  # gradio_client's
        got: list[Turn] = []
        for i, question in enumerate(questions):
            if i and time.time() >= deadline:
                break
            await asyncio.sleep(rng.uniform(0, think_s))
            conversation = len(session.secrets) - 1
            if session.kind == "openai":
                turn = await openai_turn(kind_client, session, messages, question)
            elif session.kind == "gradio":
                turn, history = await asyncio.to_thread(gradio_turn, kind_client, session, history, question)
            else:
                turn = await browser_turn(page, session, question, len(got))
            turn.conversation = conversation
            session.turns.append(turn)
            got.append(turn)
            if turn.error:
                break
        asked = [t.question for t in got]
        answers = [t.answer for t in got]
        if session.kind == "gradio":
            shown = [(m["role"], _text(m.get("content"))) for m in history if not m.get("metadata")]
            session.shown.append((conversation, json.dumps(history, ensure_ascii=False)))
            # The page escapes typed Markdown for display; compare letters and digits only.
            check_history(session, [(r, normalized(x)) if r == "user" else (r, x) for r, x in shown],
                          [normalized(q) for q in asked], answers)
        elif session.kind == "browser":
            dom = await page.evaluate(DOM_MESSAGES)
            session.shown.append((conversation, json.dumps(dom, ensure_ascii=False)))
            shown = [("user" if k == "user" else "assistant", text) for k, note, text in dom if not note]
            check_history(session, [(r, normalized(x)) if r == "user" else (r, x) for r, x in shown],
                          [normalized(q) for q in asked], answers)
            if len([1 for k, note, _ in dom if note]) != len(got):
                session.history_errors.append(f"{len(got)} answers but metrics lines: {[x for x in dom if x[1]]}")
        if len(got) == len(questions) and not got[-1].error:
            session.recalls.append(secret in got[-1].answer)
        if session.kind == "browser":
            await clear_chat(page)


# ----- the server -------------------------------------------------------------------------

def start_server(port: int, timings: Path, log: Path, max_new_tokens: int, waiting: int) -> subprocess.Popen:
    """The app with the API, greedy, in its own process; returns once /v1/models answers."""
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [PYTHON, str(ROOT / "bench" / "soak_server.py"), str(timings), "--", "--api", "--port", str(port),
         "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--api-max-waiting", str(waiting)],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start within 300 s")


# ----- the numbers ------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), or None for no values."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against their index (0 for fewer than 2 points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def foreign_hits(sessions: list[Session]) -> list[str]:
    """Secrets found in a conversation they do not belong to (answers and histories)."""
    owner = {s: (sess.name, i) for sess in sessions for i, s in enumerate(sess.secrets)}
    pattern = re.compile("|".join(re.escape(s) for s in owner)) if owner else None
    hits = []
    for sess in sessions:
        for turn in sess.turns:
            for text in (turn.answer, turn.question):
                hits += _foreign(pattern, owner, text, sess.name, turn.conversation)
        for conversation, text in sess.shown:
            hits += _foreign(pattern, owner, text, sess.name, conversation)
    return hits


def _foreign(pattern, owner: dict, text: str, name: str, conversation: int) -> list[str]:
    found = pattern.findall(text) if pattern else []
    return [f"{name} conversation {conversation}: {s} of {owner[s]}" for s in found if owner[s] != (name, conversation)]


def summarize(sessions: list[Session], records: list[dict], server_alive: bool, log_text: str,
              seconds: float, config: dict) -> dict:
    """Every check and figure of the run, as one JSON-able dict."""
    turns = [t for s in sessions for t in s.turns]
    done = [t for t in turns if not t.error]
    # Each client answer must be one the engine finished with, text for text (Markdown shown in the
    # browser keeps its letters and digits).
    finished = {}
    for r in records:
        finished.setdefault(normalized(r["text"]), []).append(r)
    unmatched = []
    for t in done:
        pool = finished.get(normalized(t.answer))
        if pool:
            pool.pop()
        else:
            unmatched.append(f"{t.session}: {t.answer[:80]!r}")
    empty = [f"{t.session}: {t.question}" for t in done if not t.answer.strip() or t.tokens <= 0]
    warm = len(records) // 4  # the first quarter fills session caches and allocator pools
    ordered = sorted(records, key=lambda r: r["ended"])
    rss = [r["rss"] for r in ordered]
    kv = [r.get("kv_bytes", 0) for r in ordered]
    sessions_end = ordered[-1].get("kv_sessions") if ordered else None
    user_ttft = [t.first - t.sent for t in done if t.first]
    recalls = [r for s in sessions for r in s.recalls]
    kinds = sorted({s.kind for s in sessions})
    return {
        "config": config,
        "seconds": round(seconds, 1),
        "checks": {
            "server_alive": server_alive,
            "tracebacks_in_server_log": log_text.count("Traceback"),
            "internal_errors_in_server_log": len(re.findall(r"internal error|code=internal", log_text, re.I)),
            "failed_turns": [f"{t.session}: {t.error}" for t in turns if t.error],
            "lost_or_truncated": unmatched + empty,
            "answers_client_vs_engine": [len(done), len(records)],
            "foreign_secrets": foreign_hits(sessions),
            "history_errors": [f"{s.name}: {e}" for s in sessions for e in s.history_errors],
        },
        "turns": len(turns),
        "turns_by_kind": {k: len([t for t in turns if t.kind == k]) for k in kinds},
        "conversations": sum(len(s.secrets) for s in sessions),
        "recall": {"asked": len(recalls), "recalled": sum(recalls),
                   "by_kind": {k: f"{sum(sum(s.recalls) for s in sessions if s.kind == k)}/"
                                  f"{sum(len(s.recalls) for s in sessions if s.kind == k)}" for k in kinds}},
        "rss_mib": {"start": round(rss[0] / 2**20, 1) if rss else None, "end": round(rss[-1] / 2**20, 1) if rss else None,
                    "max": round(max(rss) / 2**20, 1) if rss else None,
                    "slope_kib_per_answer": round(slope(rss) / 1024, 2),
                    "slope_kib_per_answer_after_warmup": round(slope(rss[warm:]) / 1024, 2),
                    "warmup_answers": warm,
                    # RSS less the KV caches the engine keeps on purpose (bounded by its budget and the API's
                    # conversation limit): what is left growing would be a leak.
                    "kv_mib_end": round(kv[-1] / 2**20, 1) if kv else None,
                    "kv_sessions_end": sessions_end,
                    "slope_kib_per_answer_less_kv_after_warmup": round(
                        slope([r - k for r, k in zip(rss[warm:], kv[warm:])]) / 1024, 2)},
        "wait_s": _quantiles([r["wait_s"] for r in records]),
        "engine_ttft_s": _quantiles([r["turn_ttft_s"] for r in records if r.get("turn_ttft_s") is not None]),
        "engine_ttft_from_send_s": _quantiles([r["ttft_s"] for r in records if r["ttft_s"] is not None]),
        "user_ttft_s": _quantiles(user_ttft),
        "user_ttft_s_by_kind": {k: _quantiles([t.first - t.sent for t in done if t.first and t.kind == k])
                                for k in kinds},
        # As the app reported them to each kind of client (metrics line, the API's `smallchat` figures).
        "reported_wait_s_by_kind": {k: _quantiles([t.waited_s for t in done if t.kind == k and t.waited_s is not None])
                                    for k in kinds},
        "reported_ttft_s_by_kind": {k: _quantiles([t.ttft_s for t in done if t.kind == k and t.ttft_s is not None])
                                    for k in kinds},
        "answers_by_kind": {k: len([t for t in done if t.kind == k]) for k in kinds},
        "decode_tok_s": _quantiles([r["decode_tok_s"] for r in records if r["decode_tok_s"]]),
        "throughput": {"answers_per_min": round(len(records) / seconds * 60, 1),
                       "tokens_per_s": round(sum(r["new_tokens"] for r in records) / seconds, 2)},
    }


def _quantiles(values: list[float]) -> dict:
    return {"p50": _r(percentile(values, 50)), "p95": _r(percentile(values, 95)), "max": _r(max(values, default=None)),
            "mean": _r(statistics.fmean(values) if values else None), "n": len(values)}


def _r(x):
    return None if x is None else round(x, 3)


def failures(summary: dict) -> list[str]:
    """What went wrong (empty when every check passed)."""
    c = summary["checks"]
    problems = [] if c["server_alive"] else ["the server died"]
    problems += [f"{c[k]} {k}" for k in ("tracebacks_in_server_log", "internal_errors_in_server_log") if c[k]]
    problems += [f"{k}: {c[k][:5]}" for k in ("failed_turns", "lost_or_truncated", "foreign_secrets", "history_errors")
                 if c[k]]
    if c["answers_client_vs_engine"][0] != c["answers_client_vs_engine"][1]:
        problems.append(f"client saw {c['answers_client_vs_engine'][0]} answers, the engine finished "
                        f"{c['answers_client_vs_engine'][1]}")
    return problems


def table(summary: dict) -> str:
    """The summary as a short plain-text table."""
    c = summary["checks"]
    q = lambda d: f"p50 {d['p50']} s · p95 {d['p95']} s · max {d['max']} s"  # noqa: E731
    rows = [
        ("sessions", f"{summary['config']['sessions']} ({summary['turns_by_kind']} turns by kind)"),
        ("duration", f"{summary['seconds']} s, {summary['turns']} turns, {summary['conversations']} conversations"),
        ("server crashes", "0" if c["server_alive"] else "DIED"),
        ("tracebacks / internal errors in log", f"{c['tracebacks_in_server_log']} / {c['internal_errors_in_server_log']}"),
        ("failed turns", str(len(c["failed_turns"]))),
        ("lost or truncated replies", str(len(c["lost_or_truncated"]))),
        ("answers seen by clients / finished by engine", "/".join(map(str, c["answers_client_vs_engine"]))),
        ("foreign secrets in answers/histories", str(len(c["foreign_secrets"]))),
        ("histories not intact", str(len(c["history_errors"]))),
        ("recall (model)", f"{summary['recall']['recalled']}/{summary['recall']['asked']} {summary['recall']['by_kind']}"),
        ("RSS MiB start/end/max", f"{summary['rss_mib']['start']} / {summary['rss_mib']['end']} / {summary['rss_mib']['max']}"),
        ("RSS slope KiB/answer (all / after warm-up)",
         f"{summary['rss_mib']['slope_kib_per_answer']} / {summary['rss_mib']['slope_kib_per_answer_after_warmup']}"),
        ("KV caches at the end", f"{summary['rss_mib']['kv_mib_end']} MiB in {summary['rss_mib']['kv_sessions_end']} sessions"),
        ("RSS less KV slope KiB/answer (after warm-up)", str(summary["rss_mib"]["slope_kib_per_answer_less_kv_after_warmup"])),
        ("wait for the engine", q(summary["wait_s"])),
        *((f"  {kind} clients (as reported)", q(d)) for kind, d in summary["reported_wait_s_by_kind"].items()),
        ("engine TTFT (after the wait)", q(summary["engine_ttft_s"])),
        ("engine TTFT from the send", q(summary["engine_ttft_from_send_s"])),
        *((f"  {kind} clients (as reported)", q(d)) for kind, d in summary["reported_ttft_s_by_kind"].items()),
        ("TTFT from the user's send (client clock)", q(summary["user_ttft_s"])),
        *((f"  {kind} clients", q(d)) for kind, d in summary["user_ttft_s_by_kind"].items()),
        ("answers by kind", str(summary["answers_by_kind"])),
        ("decode speed per answer", f"p50 {summary['decode_tok_s']['p50']} tok/s · p95 {summary['decode_tok_s']['p95']}"),
        ("throughput", f"{summary['throughput']['answers_per_min']} answers/min · "
                       f"{summary['throughput']['tokens_per_s']} tok/s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----- running it -------------------------------------------------------------------------

async def drive(url: str, sessions: list[Session], seconds: float, think_s: float, seed: int) -> None:
    """Open every session's client and run them all until the deadline (then let running turns end)."""
    from gradio_client import Client
    from openai import AsyncOpenAI
    from playwright.async_api import async_playwright

    secrets = Secrets(seed)
    clients: dict[str, object] = {}
    async with async_playwright() as p:
        browser = None
        if any(s.kind == "browser" for s in sessions):
            browser = await p.chromium.launch(executable_path=os.environ.get("SMALLCHAT_CHROMIUM", "/usr/bin/chromium"),
                                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        for s in sessions:
            if s.kind == "browser":
                context = await browser.new_context(locale="en-US", viewport={"width": 1300, "height": 900})
                page = await context.new_page()
                await page.goto(url)
                await page.wait_for_selector("#message textarea", timeout=120_000)
                clients[s.name] = page
            elif s.kind == "gradio":
                clients[s.name] = await asyncio.to_thread(Client, url, verbose=False)
            else:
                clients[s.name] = AsyncOpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=900)
        deadline = time.time() + seconds
        await asyncio.gather(*(run_session(s, clients[s.name], secrets, deadline, think_s, random.Random(f"{seed}{s.name}"))
                               for s in sessions))
        if browser is not None:
            await browser.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_sessions(total: int, browsers: int, gradio: int) -> list[Session]:
    """`total` sessions: `browsers` Chromium pages, `gradio` gradio_client ones, the rest openai clients."""
    if browsers + gradio > total:
        raise SystemExit("--browsers + --gradio must not exceed --sessions")
    kinds = ["browser"] * browsers + ["gradio"] * gradio + ["openai"] * (total - browsers - gradio)
    return [Session(f"{kind[0]}{i:02d}", kind) for i, kind in enumerate(kinds)]


def run(sessions: int = 16, minutes: float = 10.0, browsers: int = 4, gradio: int = 4, think_s: float = 2.0,
        max_new_tokens: int = 32, seed: int = 0, work: Path | None = None) -> dict:
    """Start the server, run the soak, stop the server; return the summary."""
    work = Path(work or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    timings, log = work / "answers.jsonl", work / "server.log"
    timings.write_text("")
    port = free_port()
    plan = plan_sessions(sessions, browsers, gradio)
    server = start_server(port, timings, log, max_new_tokens, waiting=sessions)
    try:
        started = time.time()
        asyncio.run(drive(f"http://127.0.0.1:{port}/", plan, minutes * 60, think_s, seed))
        seconds = time.time() - started
        time.sleep(1)  # the last answers' lines
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    records = [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
    config = {"sessions": sessions, "browsers": browsers, "gradio_client": gradio,
              "openai": sessions - browsers - gradio, "minutes": minutes, "think_s": think_s,
              "max_new_tokens": max_new_tokens, "temperature": 0, "cpu_count": os.cpu_count(), "seed": seed}
    summary = summarize(plan, records, alive, log.read_text(errors="replace"), seconds, config)
    summary["sessions"] = [{"name": s.name, "kind": s.kind, "turns": len(s.turns), "secrets": s.secrets,
                            "recalls": s.recalls} for s in plan]
    summary["turn_log"] = [asdict(t) | {"conversation": t.conversation} for s in plan for t in s.turns]
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the table, write the JSON; exit 1 if any check failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--browsers", type=int, default=4, help="sessions that are Chromium pages")
    p.add_argument("--gradio", type=int, default=4, help="sessions that use gradio_client (the rest: openai)")
    p.add_argument("--think", type=float, default=2.0, help="longest pause before each question (s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak_cpu.json"))
    p.add_argument("--work", help="folder for the server's log and answer lines (default: a new temporary one)")
    args = p.parse_args(argv)
    summary = run(args.sessions, args.minutes, args.browsers, args.gradio, args.think, args.max_new_tokens, args.seed,
                  Path(args.work) if args.work else None)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    problems = failures(summary)
    for problem in problems:
        print("FAILED:", problem)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
