"""Bad input (issue 12, measured): each kind tried against the real code, and what the user saw.

Every case below is a test. Together they write BAD_INPUT.md's table: run
`SMALLCHAT_WRITE_BAD_INPUT=1 pytest tests/test_bad_input.py` after changing a message; without it
the last test fails when the file and the code disagree. Rows marked "see" are kinds tested
elsewhere (named there); the rest run here, on the tiny model (tests/tiny.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ui.handlers import ChatHandlers, ChatSession

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "BAD_INPUT.md"
NO_PROGRESS = dict(progress=lambda *a, **k: None)


@pytest.fixture(scope="module")
def env(catalog, tiny_llama, tmp_path_factory):
    """The tiny model loaded behind chat handlers, plus a scratch folder (shown as <tmp> in the table)."""
    from models.engine import Engine
    from models.loading import LoadSettings

    engine = Engine(catalog, cache_dir=tmp_path_factory.mktemp("cache"))
    engine.load(str(tiny_llama), LoadSettings(context_tokens=512))
    return SimpleNamespace(handlers=ChatHandlers(engine), tmp=tmp_path_factory.mktemp("bad"), tiny=tiny_llama)


@pytest.fixture(scope="module")
def seen() -> dict:
    """What each case showed the user, for the table."""
    return {}


CASES: list[tuple[str, str, object]] = []


def case(kind: str, tried: str):
    """Register a check: it gets `env`, asserts what must happen, and returns what the user saw."""
    def register(fn):
        CASES.append((kind, tried, fn))
        return fn
    return register


def note(history) -> str:
    """The last UI-only line of a chat (a notice, an error or the metrics)."""
    return history[-1]["metadata"]["title"]


def submitted(env, text, history=None, numbers=(0, 0.9, 8)):
    """The page's send: (text left in the box, chat), then the answer's final chat."""
    session = ChatSession()
    box, chat = env.handlers.submit(text, list(history or []), session, "en", *numbers)
    final = list(env.handlers.answer(chat, "", *numbers, session, "en"))[-1]
    return box, chat, final


def refused_number(env, numbers) -> str:
    """Send with these (temperature, top-p, max new tokens): must be refused in the chat, the text kept."""
    box, chat, final = submitted(env, "Hello", numbers=numbers)
    assert box == "Hello" and chat[-1].get("metadata") and final == chat, final
    return note(chat)


def load_status(env, model, context=512) -> str:
    """Load `model` from the model box; the tiny model must stay loaded and the box go back to it."""
    before = env.handlers.engine.loaded
    status, _, box, _ = env.handlers.load(str(model), "none", False, None, context, "en", **NO_PROGRESS)
    assert env.handlers.engine.loaded is before and box == before.ref.label, status
    return status.split("\n\n")[0]


def api_error(body) -> str:
    """What an API client gets for this body: a 400/413 JSON error (status, param and message)."""
    from api.errors import ApiError
    from api.schema import parse_chat_request, parse_json

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        parse_chat_request(parse_json(raw))
    error = e.value.body()["error"]
    assert e.value.status in (400, 413) and error["message"]
    param = f" (param `{error['param']}`)" if error["param"] else ""
    return f"HTTP {e.value.status}{param}: {error['message']}"


def a_copy(env, name) -> Path:
    folder = env.tmp / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(env.tiny, folder)
    return folder


# ----- messages -------------------------------------------------------------------------

@case("Control characters in a message (page)", "NUL, BEL, an ANSI colour escape and DEL inside the text")
def _(env):
    text = "a\x00b\x07 \x1b[31mred\x1b[0m \x7f end"
    box, chat, final = submitted(env, text)
    assert box == "" and final[0]["content"] == text and "TTFT" in note(final)
    return "Sent and answered; the message is kept exactly as typed (the model gets the raw text)."


@case("Invalid Unicode in a message (page)", "a lone UTF-16 surrogate (\\ud800), as broken pasted text arrives")
def _(env):
    box, chat, final = submitted(env, "hi \ud800 there")
    assert box == "hi \ud800 there" and len(chat) == 1 and final == chat
    return note(chat)


@case("Invalid Unicode in a message (/answer API)", "a history whose last message holds a lone surrogate")
def _(env):
    asked = [{"role": "user", "content": "x\udfff"}]
    out = list(env.handlers.answer(asked, "", 0, 0.9, 8, ChatSession(), "en"))
    assert len(out) == 1 and out[0][0] == asked[0]
    return note(out[0])


@case("Invalid Unicode in the system prompt (page)", "a lone surrogate in Settings → System prompt")
def _(env):
    session = ChatSession()
    _, chat = env.handlers.submit("Hello", [], session, "en", 0, 0.9, 8)
    final = list(env.handlers.answer(chat, "sys \ud800", 0, 0.9, 8, session, "en"))[-1]
    assert final[0]["content"] == "Hello" and len(final) == 2
    return note(final)


@case("Empty or blank message (page)", "Send with nothing, or only spaces and newlines")
def _(env, monkeypatch=None):
    import gradio as gr

    said = []
    original = gr.Warning
    gr.Warning = lambda message, *a, **k: said.append(message)
    try:
        box, chat = env.handlers.submit("  \n ", [], ChatSession(), "en", 0, 0.9, 8)
    finally:
        gr.Warning = original
    assert box == "  \n " and chat == [] and said
    return f"A toast: \"{said[0]}\"; nothing is sent."


@case("A message over the size limit (page)", "60,000 characters (the limit is --max-message-chars, 50,000)")
def _(env):
    box, chat, final = submitted(env, "x" * 60_000)
    assert box == "x" * 60_000 and final == chat
    return note(chat)


@case("A malformed history (/answer API)", "content 42, role \"robot\", a bare string instead of a list")
def _(env):
    import gradio as gr

    from ui.chatbot import ChatHistoryData

    said = []
    for bad in ([{"role": "user", "content": 42}], [{"role": "robot", "content": "x"}], "Hi"):
        with pytest.raises(gr.Error) as e:
            ChatHistoryData.model_validate(bad)
        said.append(str(e.value))
    assert all(said)
    return said[0]


@case("HTML and JavaScript typed as a message (page)", "<script>, <img src=x onerror=…>, <svg onload=…>")
def _(env):
    return ("see tests/test_browser_shared_use.py::test_typed_html_shows_as_the_literal_text_and_fetches_nothing "
            "(real Chromium): the literal text is shown, nothing runs, no request goes to /x.")


# ----- numbers ----------------------------------------------------------------------------

@case("Temperature out of range or not a number (page and /answer)", "−1, 2.5, \"abc\", NaN, empty")
def _(env):
    said = [refused_number(env, (t, 0.9, 8)) for t in (-1, 2.5, "abc", float("nan"), None)]
    assert all("Temperature (0 = greedy) must be a number from 0 to 2" in s for s in said)
    return said[0]


@case("Top-p out of range or not a number (page and /answer)", "0, 1.5, \"x\", empty")
def _(env):
    said = [refused_number(env, (0.2, p, 8)) for p in (0, 1.5, "x", None)]
    assert all("Top-p must be a number from 0.05 to 1" in s for s in said)
    return said[0]


@case("Max new tokens out of range or not whole (page and /answer)", "0, −5, 2.5, 10⁹, \"abc\"")
def _(env):
    said = [refused_number(env, (0.2, 0.9, n)) for n in (0, -5, 2.5, 10 ** 9, "abc")]
    assert all("Max new tokens must be a whole number from 1 to 4096" in s for s in said)
    return said[0]


@case("Context length out of range or not whole (Load, fit check)", "0, 100, 10⁷, 1000.5, \"abc\"")
def _(env):
    said = []
    for bad in (0, 100, 10 ** 7, 1000.5, "abc"):
        said.append(load_status(env, "smollm2-135m-instruct", context=bad))
        assert "Context length" in env.handlers.fit_check("smollm2-135m-instruct", "none", False, None, bad, "en")
    assert all("must be a whole number from 256 to 32768" in s for s in said)
    assert not any("Nothing was sent" in s for s in said)  # a load has no message to keep
    return said[0]


@case("GPU budget out of range or not a number (Load, fit check; on a GPU)", "0, 0.1, 1000 GiB on an 8 GiB card, \"abc\"")
def _(env):
    from models.memory import GiB
    from ui.handlers import BadNumber, ModelChoice

    gpu = SimpleNamespace(device="cuda", memory=lambda: SimpleNamespace(total=8 * GiB))  # what ModelChoice asks
    said = []
    for bad in (0, 0.1, 1000, "abc"):
        with pytest.raises(BadNumber) as e:
            ModelChoice("smollm2-135m-instruct", "none", gpu_budget_gib=bad).load_settings(gpu, "en")
        said.append(str(e.value))
    assert all("GPU budget" in s and "from 0.5 to 8" in s and "Nothing was sent" not in s for s in said), said
    return said[0]


@case("Sampling numbers out of range or of the wrong type (OpenAI API)",
      "temperature \"hot\"/3, top_p 0, max_tokens 0/1.5, seed \"x\"")
def _(env):
    base = {"messages": [{"role": "user", "content": "Hi"}]}
    said = [api_error({**base, **change}) for change in ({"temperature": "hot"}, {"temperature": 3}, {"top_p": 0},
                                                          {"max_tokens": 0}, {"max_tokens": 1.5}, {"seed": "x"})]
    assert all(s.startswith("HTTP 400 (param") for s in said)
    return said[1]


@case("Compare tab numbers out of range", "temperature, top-p, max new tokens and seed")
def _(env):
    return ("see tests/test_shared_use.py::test_the_compare_tab_refuses_bad_numbers_before_loading_anything: "
            "the same sentences as the chat, before anything loads.")


# ----- the OpenAI API's body --------------------------------------------------------------

@case("Invalid UTF-8 bytes in the JSON body (OpenAI API)", "raw bytes 0xFF 0xFE inside a string")
def _(env):
    said = api_error(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert "not valid JSON" in said
    return said


@case("A lone surrogate escape in the JSON body (OpenAI API)", "\"content\": \"\\ud800\" (valid JSON, not valid text)")
def _(env):
    said = api_error(b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
    assert "messages[0].content" in said
    return said


@case("Control characters in the JSON body (OpenAI API)", "a raw (unescaped) 0x01 inside a string; escaped \\u0000")
def _(env):
    from api.schema import parse_chat_request, parse_json
    from models.generation import SamplingSettings

    said = api_error(b'{"messages": [{"role": "user", "content": "a\x01b"}]}')
    assert "Invalid control character" in said
    request = parse_chat_request(parse_json(b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}'))
    engine = env.handlers.engine
    import threading

    updates = list(engine.chat(request.messages, SamplingSettings(4, 0.0, 1.0), threading.Event()))
    assert updates[-1].done
    return f"Raw: {said} Escaped: accepted and answered."


@case("Malformed messages (OpenAI API)", "an empty list, role \"wizard\", content 5, an image part")
def _(env):
    said = [api_error({"messages": m}) for m in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}],
                                                 [{"role": "user", "content": [{"type": "image_url"}]}])]
    assert all(s.startswith("HTTP 400") for s in said)
    return said[2]


@case("Not JSON, not an object, or too big (OpenAI API)", "\"{not json\", \"[1, 2]\", a 5 MiB body")
def _(env):
    said = [api_error(b"{not json"), api_error(b"[1, 2]"), api_error(b"x" * (5 << 20))]
    assert said[2].startswith("HTTP 413")
    return said[0] + " / " + said[2]


# ----- the model box ----------------------------------------------------------------------

@case("Corrupt safetensors (model box)", "model.safetensors overwritten with garbage")
def _(env):
    folder = a_copy(env, "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 32)
    said = load_status(env, folder)
    assert "is damaged" in said and "Still using" in env.handlers.load(str(folder), "none", False, None, 512, "en",
                                                                         **NO_PROGRESS)[0]
    return said


@case("Truncated safetensors (model box)", "model.safetensors cut to half its size (an interrupted copy)")
def _(env):
    folder = a_copy(env, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    said = load_status(env, folder)
    assert "is damaged" in said
    return said


@case("Tokenizer from another model (model box)", "a tokenizer with more tokens than the model's embedding")
def _(env):
    from tiny import write_tokenizer

    folder = a_copy(env, "mismatch")
    for f in folder.glob("tokenizer*"):
        f.unlink()
    write_tokenizer(folder, vocab_size=600)
    said = load_status(env, folder)
    assert "belong to different models" in said
    return said


@case("config.json that is not JSON (model box)", "a truncated config.json")
def _(env):
    folder = a_copy(env, "badconfig")
    (folder / "config.json").write_text('{"model_type": "llama", ')
    said = load_status(env, folder)
    assert "not valid JSON" in said
    return said


@case("A folder that is not a model (model box)", "a folder without weights; a missing path; a plain file")
def _(env):
    empty = env.tmp / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "config.json").write_text('{"model_type": "llama"}')
    plain = env.tmp / "notes.txt"
    plain.write_text("hello")
    said = [load_status(env, empty), load_status(env, env.tmp / "missing"), load_status(env, plain)]
    assert "has no weights" in said[0] and "Could not load" in said[1] and "Could not load" in said[2]
    return " / ".join(said)


@case("A hub id while offline (model box)", "someone/some-model with no network")
def _(env):
    said = load_status(env, "someone/not-a-cached-model")
    assert "offline" in said or "cannot be reached" in said
    return said


# ----- prompt sets, imports, paths ------------------------------------------------------------

@case("Malformed prompt set (Compare tab, prompts/*.toml)", "TOML with an unclosed string")
def _(env):
    from compare.prompt_sets import PromptSetError, load_prompt_set

    path = env.tmp / "broken.toml"
    path.write_text('name = "Mine"\nlanguage = "en"\n\n[[questions]]\ntext = "Hi\n')
    with pytest.raises(PromptSetError) as e:
        load_prompt_set(path)
    assert "line 5, column" in str(e.value)
    return str(e.value)


@case("Prompt set with a wrong schema (Compare tab)", "a misspelt key, keywords = [1, 2], no questions")
def _(env):
    from compare.prompt_sets import PromptSetError, parse_prompt_set

    said = []
    for text in ('name = "x"\nlanguage = "en"\n[[questions]]\ntxt = "oops"\n',
                 'name = "x"\nlanguage = "en"\n[[questions]]\ntext = "Hi"\nkeywords = [1, 2]\n',
                 'name = "x"\nlanguage = "en"\n'):
        with pytest.raises(PromptSetError) as e:
            parse_prompt_set(text, "mine.toml")
        said.append(str(e.value))
    assert "unknown key 'txt'" in said[0] and "keywords must be" in said[1] and "no questions" in said[2]
    return said[0]


@case("Prompt set that is not UTF-8 text (Compare tab)", "a file of Latin-1 bytes")
def _(env):
    from compare.prompt_sets import PromptSetError, load_prompt_set

    path = env.tmp / "latin1.toml"
    path.write_bytes('name = "Café"\n'.encode("latin-1"))
    with pytest.raises(PromptSetError) as e:
        load_prompt_set(path)
    assert "not UTF-8" in str(e.value)
    return str(e.value)


@case("A malformed imported chat (Import)", "not JSON, not UTF-8, a wrong format, role \"robot\", an unknown field")
def _(env):
    from ui import chat_file
    said = []
    for data in (b"{not json", b"\xff\xfe", b'{"format": "other"}', b"[]"):
        with pytest.raises(chat_file.ChatFileError) as e:
            chat_file.from_json(data)
        said.append(str(e.value))
    assert "not valid JSON" in said[0] and "not UTF-8" in said[1]
    return " / ".join(said[:3])


@case("A local path outside the allowed roots (exposed app)", "/etc, roots/../outside, a symlink out of a root")
def _(env):
    from models import model_roots as roots
    from models.engine import Engine
    from models.loading import LoadSettings

    root = env.tmp / "roots"
    if not root.exists():
        shutil.copytree(env.tiny, root / "inside")
    engine = Engine(env.handlers.engine.catalog, cache_dir=env.tmp / "cache2", model_roots=roots.ModelRoots.of([root]))
    engine.load(str(root / "inside"), LoadSettings(context_tokens=256))
    handlers = ChatHandlers(engine)
    before = engine.loaded
    said = []
    for bad in ("/etc", f"{root}/../bad"):
        status = handlers.load(bad, "none", False, None, 256, "en", **NO_PROGRESS)[0]
        assert engine.loaded is before and "outside the model roots" in status, status
        said.append(status.split("\n\n")[0])
    return said[0]


# ----- the API's model choice (per-user models) ------------------------------------------------

@case("A model that is not in memory (OpenAI API, no key)", "a catalog id:quant nobody loaded; an id not in the catalog")
def _(env):
    from api.errors import ApiError
    from api.service import ApiService, ApiSettings

    service = ApiService(env.handlers.engine, ApiSettings(allow_load=True))  # no key: every caller is anonymous
    before = list(env.handlers.engine.residents())
    said = []
    for name, status in (("qwen2.5-1.5b-instruct:4bit", 409), ("gpt-17", 404)):
        with pytest.raises(ApiError) as e:
            service.check_model(name)
        assert e.value.status == status, e.value.message
        said.append(f"HTTP {status}: {e.value.message}".replace(str(env.tiny), "<tiny model>"))
    assert env.handlers.engine.residents() == before  # nothing loaded or unloaded
    return said[0]


# ----- the table ----------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input(index, env, seen):
    kind, tried, check = CASES[index]
    saw = check(env)
    assert saw and "Traceback" not in saw
    seen[index] = saw.replace(str(env.tmp), "<tmp>")


# Kinds whose code is on a branch not merged when the table was last written: shown as "not yet".
# (None now: chat import and model roots came with branch persist.)
PENDING: dict[str, str] = {}


def render(seen: dict) -> str:
    """BAD_INPUT.md: one row per case, in the order above."""
    def cell(text: str) -> str:
        text = text.replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= 400 else text[:399] + "…"

    rows = [f"| {i + 1} | {cell(kind)} | {cell(tried)} | {cell(seen[i] if i in seen else 'not yet: ' + PENDING[kind])} |"
            for i, (kind, tried, _) in enumerate(CASES)]
    return ("# Bad input: what was tried and what the user saw\n\n"
            "Generated by `tests/test_bad_input.py` (each row is a test there, or names the test elsewhere that covers "
            "it); `SMALLCHAT_WRITE_BAD_INPUT=1 pytest tests/test_bad_input.py` rewrites it. Paths under a test's "
            "scratch folder show as `<tmp>`.\n\n"
            "| # | Kind | Tried | What the user saw |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def test_the_table_in_bad_input_md_is_what_the_code_does(seen):
    missing = [kind for i, (kind, _, _) in enumerate(CASES) if i not in seen and kind not in PENDING]
    if missing:
        pytest.skip(f"needs every case above in the same run (missing: {missing[0]})")
    text = render(seen)
    if os.environ.get("SMALLCHAT_WRITE_BAD_INPUT"):
        TABLE.write_text(text)
    assert TABLE.read_text() == text, "BAD_INPUT.md is stale: rerun with SMALLCHAT_WRITE_BAD_INPUT=1"
    assert len(CASES) - len([k for k, _, _ in CASES if k in PENDING]) >= 20
