"""Chats that survive (issue 12), in real Chromium: the chat, settings and model choice come back on reload
and after the server is killed mid-answer and restarted; export as JSON/Markdown and import back; a
malformed import is refused with a message and the chat is kept."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError

from net import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STORY = "Write a very long story about a dragon who learns to cook. Make it at least ten paragraphs."


def start_app(port: int, log_path: Path) -> subprocess.Popen:
    """app.py as a user starts it (the embedded model, here in bf16), ready to serve."""
    log = open(log_path, "a")
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--max-new-tokens", "200",
                               "--quant", "bf16"],
                              stdout=log, stderr=log, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        assert server.poll() is None, Path(log_path).read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(1)
    server.kill()
    raise AssertionError("the app did not start: " + Path(log_path).read_text()[-3000:])


def open_page(context, url: str):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea", timeout=60_000)
    return page


def reload(page) -> None:
    """The browser's reload, as a person presses it. Right after a restart the page's own reconnect may start a
    navigation of its own, which aborts the reload ("net::ERR_ABORTED; frame was detached", seen once in CI):
    then it is pressed again, as a person would, up to three times."""
    for attempt in range(3):
        try:
            page.reload()
            return
        except PlaywrightError as error:
            if attempt == 2 or "ERR_ABORTED" not in str(error):
                raise
            page.wait_for_timeout(1_000)


def chat_text(page) -> str:
    return page.inner_text("#chatbot")


def upload(page, path: Path) -> None:
    """Choose `path` with the Import button, as a user does."""
    with page.expect_file_chooser() as chooser:
        page.click("#import-json")
    chooser.value.set_files(str(path))


def wait_for_status(page, *texts: str, timeout: int = 180_000, log_path: Path | None = None) -> None:
    """Wait until the status line says one of `texts`; if it never does, fail with what it says instead and the
    app's log (a rare timeout under load in CI left nothing to go on)."""
    said = " || ".join(f"status.includes({json.dumps(text)})" for text in texts)
    try:
        page.wait_for_function(f"(() => {{ const status = document.querySelector('#status').innerText; "
                               f"return {said}; }})()", timeout=timeout)
    except Exception as error:  # noqa: BLE001 - playwright's TimeoutError: said with what the page shows
        shown = page.inner_text("#status")
        log = Path(log_path).read_text()[-3000:] if log_path is not None and Path(log_path).exists() else ""
        raise AssertionError(f"the status never said any of {texts!r}; it says {shown!r}\n{log}") from error


def test_chat_settings_and_model_come_back_after_a_server_restart_mid_answer(browser, tmp_path):
    port = free_port()  # the same port after the restart: the browser's storage belongs to the origin
    url = f"http://127.0.0.1:{port}/"
    server = start_app(port, tmp_path / "app.log")
    context = browser.new_context(locale="en-US", viewport={"width": 1400, "height": 1000})
    try:
        page = open_page(context, url)
        wait_for_status(page, "smollm2-135m-instruct (bf16")
        page.click("#quant input")  # the model choice: full precision (bf16 is the server's start-up choice)
        page.click("ul[role='listbox'] li:has-text('none')")
        wait_for_status(page, "Loaded smollm2-135m-instruct (none")
        page.click("#settings")
        system_prompt = page.locator("#settings textarea")
        system_prompt.wait_for(timeout=15_000)
        # The accordion mounts its controls lazily: text filled in within milliseconds of opening it never
        # reached Gradio's value (every save then held ""). A person cannot type that fast; let it settle.
        page.wait_for_timeout(500)
        system_prompt.fill("You are a terse assistant.")
        system_prompt.blur()
        box = page.locator("#max-new-tokens input[type='number']")
        box.fill("150")
        box.press("Enter")
        page.wait_for_timeout(500)
        page.fill("#message textarea", "What is the capital of France?")
        page.press("#message textarea", "Enter")
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=120_000)
        first_turn = chat_text(page)
        metrics_line = re.search(r"TTFT[^\n]+", first_turn).group(0)
        page.wait_for_timeout(2_000)  # the chat is saved right after the answer's last step (a quick, unqueued event)

        # A plain reload brings everything back (same server).
        page.reload()
        page.wait_for_selector("#message textarea", timeout=60_000)
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=60_000)
        assert "What is the capital of France?" in chat_text(page)

        stored = "localStorage.getItem('smallchat-chat-v1')"  # encrypted: compared, not read
        stored_before_story = page.evaluate(stored)
        console = []
        page.on("console", lambda message: console.append(message.text[:300]))
        page.fill("#message textarea", STORY)
        page.press("#message textarea", "Enter")
        page.wait_for_function("document.querySelector('#chatbot').innerText.split(/\\s+/).length > "
                               f"{len(first_turn.split()) + len(STORY.split()) + 10}", timeout=120_000)  # the answer streams
        saved_story = page.evaluate(stored) != stored_before_story  # said if the restore below lacks the story
        server.kill()  # mid-answer, no goodbye
        server.wait(timeout=30)

        server = start_app(port, tmp_path / "app.log")  # starts with the embedded model in bf16 again
        reload(page)
        page.wait_for_selector("#message textarea", timeout=60_000)
        page.wait_for_function("document.querySelector('#persist-note').innerText.includes('Restored your chat')",
                               timeout=60_000)
        restored = chat_text(page)
        assert "What is the capital of France?" in restored and metrics_line in restored  # the first turn as it was
        # The message being answered when the server died. It failed once in CI (first turn restored, not this
        # one) and never in 10 runs here, under load or not: if it fails again, say what the browser had kept.
        assert STORY in restored, (f"the browser's saved chat {'had' if saved_story else 'had not'} changed since "
                                   f"the story was sent; console: {console[-20:]}\n"
                                   + (tmp_path / "app.log").read_text()[-3000:])
        # Loaded again, by this reload or by the page's own: after a restart Gradio's page reloads itself once it
        # reaches the server, and whichever of the two loads comes second finds the model in memory.
        wait_for_status(page, "Loaded smollm2-135m-instruct (none", "smollm2-135m-instruct (none) is already in memory",
                        log_path=tmp_path / "app.log")
        assert page.input_value("#quant input") == "none"
        page.click("#settings")
        assert page.input_value("#settings textarea") == "You are a terse assistant."
        assert page.input_value("#max-new-tokens input[type='number']") == "150"
        # It answers on from there: Regenerate answers the message the server died on.
        words = len(chat_text(page).split())
        page.click("#regenerate")
        page.wait_for_function(f"document.querySelector('#chatbot').innerText.split(/\\s+/).length > {words + 10}",
                               timeout=120_000)
        page.click("#stop")
        page.wait_for_function("document.querySelector('#chatbot').innerText.split('TTFT').length > 2", timeout=60_000)
    finally:
        context.close()
        server.kill()
        server.wait(timeout=30)


def test_export_json_and_markdown_then_import_back_and_a_bad_file_keeps_the_chat(browser, app_url, tmp_path):
    context = browser.new_context(locale="en-US", viewport={"width": 1400, "height": 1000})
    elsewhere = []  # requests the page makes to anywhere but the app: fonts, analytics, CDNs
    context.on("request", lambda request: None if request.url.startswith((app_url, "data:", "blob:"))
               else elsewhere.append(request.url))
    try:
        page = open_page(context, app_url)
        page.fill("#message textarea", "What is the capital of France? <b>bold</b>")
        page.press("#message textarea", "Enter")
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=120_000)
        # The answer's last (save) step may still show its overlay, and Gradio's pending dots ("Loading content")
        # may linger until the event ends on a loaded machine.
        page.wait_for_function("!/queue:|Loading content/.test(document.querySelector('#chatbot').innerText)",
                               timeout=30_000)
        before = chat_text(page)
        # The browser keeps the chat encrypted, and nowhere in plain text: Gradio's run history (on by default)
        # would store every answer's whole chat in localStorage.
        # (The chat is saved by the answer's last step, which may still be on its way on a loaded machine.)
        page.wait_for_function("localStorage.getItem('smallchat-chat-v1') !== null", timeout=30_000)
        kept = page.evaluate("[localStorage, sessionStorage].flatMap(s => Object.keys(s).map(k => [k, s.getItem(k)]))")
        assert not [key for key, value in kept if "capital of France" in value or "run-history" in key]
        assert elsewhere == []  # the page works offline and tells no third party anything

        page.click("#export-md")
        page.wait_for_selector("#export-file a[download]", timeout=30_000)
        markdown = page.request.get(page.get_attribute("#export-file a[download]", "href")).body().decode()
        assert "**You**\n\nWhat is the capital of France? <b>bold</b>" in markdown and "TTFT" in markdown
        page.click("#export-json")
        page.wait_for_function("document.querySelector('#export-file a[download]').href.endsWith('.json')",
                               timeout=30_000)
        exported = page.request.get(page.get_attribute("#export-file a[download]", "href")).body()
        chat = json.loads(exported)
        assert chat["format"] == "smallchat-chat" and chat["model"] == "smollm2-135m-instruct"
        assert chat["messages"][0] == {"role": "user", "content": "What is the capital of France? <b>bold</b>"}
        assert chat["settings"]["max_new_tokens"] == 200 and "TTFT" in chat["messages"][-1]["metadata"]["title"]

        bad = tmp_path / "bad.json"
        for content, says in ((b'{"format": "smallchat-chat", "version": 1, "messages": [{"role": "user", "content": "a\\u0007"}]}',
                               "control character (U+0007)"),
                              (b"{oops", "not valid JSON"),
                              (json.dumps({**chat, "messages": [{"role": "robot", "content": "x"}]}).encode(),
                               '"role" must be "user" or "assistant"')):
            bad.write_bytes(content)
            upload(page, bad)
            page.wait_for_function(f"document.querySelector('#persist-note').innerText.includes({json.dumps(says)})",
                                   timeout=30_000)
            assert "Your current chat is kept" in page.inner_text("#persist-note")
            assert chat_text(page) == before

        page.click("#clear")
        page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('capital')", timeout=30_000)
        good = tmp_path / "chat.json"
        good.write_bytes(exported)
        upload(page, good)
        page.wait_for_function("document.querySelector('#persist-note').innerText.includes('Imported')", timeout=30_000)
        page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=30_000)
        assert chat_text(page) == before  # exactly as it was, typed HTML still shown as text
    finally:
        context.close()
