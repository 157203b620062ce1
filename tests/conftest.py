"""Shared fixtures: offline hub, a per-run model cache, tiny checkpoints, the embedded model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The unpacked embedded model is cached under the repo (git-ignored) so local reruns are fast.
os.environ.setdefault("SMALLCHAT_CACHE", str(ROOT / ".cache" / "smallchat"))

from net import free_port  # noqa: E402
from tiny import write_tiny_llama  # noqa: E402

# Files that take longest run first: with `-n 2 --dist loadfile` (the README's command) a process takes
# files in collection order, and the soak's ~100 s started last would leave the other process idle.
LONGEST_FIRST = ("test_soak.py",)


def pytest_collection_modifyitems(items) -> None:
    """Collect the longest test files first (a stable sort: the rest keep their order)."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with a chat-template tokenizer, on disk."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def catalog():
    """The real catalog."""
    from models.catalog import load_catalog

    return load_catalog()


@pytest.fixture(scope="session")
def embedded_engine(catalog):
    """An engine with the real embedded SmolLM2 loaded (unpacked once per cache)."""
    from models.engine import Engine
    from models.loading import LoadSettings

    engine = Engine(catalog)
    engine.load("", LoadSettings())
    return engine


@pytest.fixture(scope="session")
def app_url(embedded_engine):
    """The real app (embedded model, greedy by default) served on localhost for client and browser tests."""
    from ui.layout import UiDefaults, build_demo, launch_kwargs

    demo = build_demo(embedded_engine, UiDefaults(temperature=0.0, max_new_tokens=200))
    port = free_port()
    demo.queue(default_concurrency_limit=None).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(demo)
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright; CI (SMALLCHAT_REQUIRE_BROWSER) fails instead of skipping."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("SMALLCHAT_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (CI) but /usr/bin/chromium is missing")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("SMALLCHAT_REQUIRE_BROWSER"):
            pytest.fail("playwright is required here (CI) but is not installed")
        pytest.skip("playwright not installed (pip install playwright)")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


# Installed in a page by watch_texts: every distinct combination of the elements' texts, appended as the DOM
# changes (the page records a streamed answer's every step; polling from the test missed steps on a busy CPU).
_WATCH_TEXTS = """(selectors) => {
  const elements = selectors.map(selector => document.querySelector(selector));
  window.__textStates = [];
  const record = () => {
    const state = elements.map(element => element.innerText);
    const last = window.__textStates[window.__textStates.length - 1];
    if (!last || state.some((text, i) => text !== last[i])) window.__textStates.push(state);
  };
  for (const element of elements) {
    new MutationObserver(record).observe(element, {childList: true, subtree: true, characterData: true});
  }
}"""


def watch_texts(page, *selectors: str) -> None:
    """Start recording, in the page, every state the elements' texts pass through (watched_texts reads them)."""
    page.evaluate(_WATCH_TEXTS, list(selectors))


def watched_texts(page) -> list[tuple[str, ...]]:
    """The states recorded since watch_texts, oldest first: one text per selector."""
    return [tuple(state) for state in page.evaluate("window.__textStates")]
