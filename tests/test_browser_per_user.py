"""Issue 12 (per-user model choice) in real Chromium: two users' tabs, one switches to 4-bit; the other keeps its
own model (its label and its answers), both see what is in memory, and each answer names the model that wrote it."""

import json
import re

import pytest

pytestmark = pytest.mark.slow
FRANCE = "What is the capital of France?"


def open_tab(browser, url: str):
    # Two browser contexts: two users (a context's tabs share the browser's saved chat and model choice).
    context = browser.new_context(locale="en-US", viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#message textarea", timeout=60_000)
    return context, page


def wait_text(page, selector: str, text: str, timeout: int = 120_000) -> None:
    page.wait_for_function(f"document.querySelector({json.dumps(selector)}).innerText.includes({json.dumps(text)})",
                           timeout=timeout)


def ask(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    wait_text(page, "#chatbot", "TTFT")


def leave_only_the_default(engine) -> None:
    """The shared engine with its default model only (other tests may have left a comparison's model in memory)."""
    for model in engine.residents():
        if model is not engine.loaded:
            engine.run_exclusive(lambda key=model.key: engine._unload_locked(key))


def test_tab_b_switching_to_4bit_changes_nothing_in_tab_a(browser, app_url, embedded_engine):
    leave_only_the_default(embedded_engine)  # so B's switch really loads
    context_a, tab_a = open_tab(browser, app_url)
    context_b, tab_b = open_tab(browser, app_url)
    try:
        wait_text(tab_a, "#status", "Current model: smollm2-135m-instruct (none)")
        tab_b.click("#quant input")
        tab_b.click("ul[role='listbox'] li:has-text('4bit')")
        wait_text(tab_b, "#status", "Only this tab switched")
        assert "Loaded smollm2-135m-instruct" in tab_b.inner_text("#status")
        # Tab A: its own label and model box are unchanged; the shared line (a 1 s timer) shows both models.
        # (Once B's load has ended: a tick answered during it said "loading … (4bit)".)
        tab_a.wait_for_function("(t => t.includes('smollm2-135m-instruct (4bit)') && !t.includes('loading'))"
                                "(document.querySelector('#residents').innerText)", timeout=15_000)
        residents = tab_a.inner_text("#residents")  # may start with the timer's pending-time overlay ("0.1s")
        assert "smollm2-135m-instruct (none)" in residents and re.search(r"^In memory now: ", residents, re.M), residents
        assert "Current model: smollm2-135m-instruct (none)" in tab_a.inner_text("#status")
        assert tab_a.input_value("#quant input") == "none"
        # Each answers with its own model, alternately, and each answer names it.
        ask(tab_a, FRANCE)
        ask(tab_b, FRANCE)
        assert "by smollm2-135m-instruct (none)" in tab_a.inner_text("#chatbot")
        assert "by smollm2-135m-instruct (4bit)" in tab_b.inner_text("#chatbot")
        assert "Paris" in tab_a.inner_text("#chatbot")
        ask_again = tab_a.inner_text("#chatbot").count("TTFT")
        tab_a.fill("#message textarea", "And of Italy?")
        tab_a.press("#message textarea", "Enter")
        tab_a.wait_for_function(f"document.querySelector('#chatbot').innerText.split('TTFT').length > {ask_again + 1}",
                                timeout=120_000)
        assert "(4bit)" not in tab_a.inner_text("#chatbot") and "for you" not in tab_a.inner_text("#chatbot")
    finally:
        context_a.close()
        context_b.close()
        leave_only_the_default(embedded_engine)  # as the other tests expect the shared engine
