"""The Compare tab in real Chromium (Debian's, driven by Playwright), on the embedded model at two
quantizations: both panes stream with their metrics, then a batch fills the table row by row and
its CSV and JSONL downloads parse and hold every row."""

import csv
import io
import json
import os
import time

import pytest

from conftest import watch_texts, watched_texts

pytestmark = pytest.mark.slow
@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(locale="en-US", viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    page.click("button[role='tab']:has-text('Compare')")
    page.wait_for_selector("#compare-prompt textarea", timeout=15_000)
    yield page
    context.close()


def pick(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.click(f"ul[role='listbox'] li:has-text('{option}')")


def set_number(page, elem_id: str, value: int) -> None:
    """Type a number into a slider's box and make sure it stuck (a late re-render can put the old one back)."""
    box = page.locator(f"#{elem_id} input[type='number']")
    for _ in range(3):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(500)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} kept {box.input_value()!r} instead of {value}")


def test_a_and_b_stream_side_by_side_with_metrics(page):
    pick(page, "compare-quant-a", "none")
    pick(page, "compare-quant-b", "4bit")
    page.fill("#compare-prompt textarea", "What is the capital of France?")
    # Every state the two panes pass through, recorded by the page itself as the DOM changes: polling
    # from here missed steps when the CPU was busy (a short answer could appear whole between two polls).
    watch_texts(page, "#compare-pane-a", "#compare-pane-b")
    page.click("#compare-run")
    page.wait_for_function("document.querySelector('#compare-metrics-b').innerText.includes('tok/s')",
                           timeout=120_000)
    seen = watched_texts(page)
    a, b = page.inner_text("#compare-pane-a"), page.inner_text("#compare-pane-b")
    assert "Paris" in a and "Paris" in b
    # A streams first (B waits), then B streams: both in several steps.
    a_partial = {pa for pa, pb in seen if pa and pa != a and "Paris" not in pb}
    b_partial = {pb for pa, pb in seen if pa == a and pb and pb != b and "Loading" not in pb and "Waiting" not in pb}
    assert len(a_partial) >= 2, seen
    assert len(b_partial) >= 2, seen
    for side in ("a", "b"):
        metrics = page.inner_text(f"#compare-metrics-{side}")
        assert "TTFT" in metrics and "tok/s" in metrics and "tokens" in metrics and "peak" in metrics, metrics
        assert "weights" in metrics and ("loaded in" in metrics or "already loaded" in metrics), metrics
    assert "Loaded now:" in page.inner_text("#compare-status")
    page.screenshot(path=os.environ.get("SMALLCHAT_COMPARE_SCREENSHOT", "/tmp/smallchat-compare.png"), full_page=True)


def test_batch_fills_the_table_and_exports_csv_and_jsonl(page):
    page.click("#compare-settings .label-wrap")
    set_number(page, "compare-max-new", 24)
    page.click("#compare-batch .label-wrap")
    questions = ["What is the capital of France?", "How many days are there in a week?"]
    page.fill("#compare-paste textarea", "\n".join(questions) + "\n\n")  # blank lines are ignored
    page.click("#compare-batch-run")
    progress = set()
    deadline = time.time() + 120
    while time.time() < deadline and "Done" not in page.inner_text("#compare-summary"):
        progress.add(page.inner_text("#compare-summary").split("\n")[0])
        time.sleep(0.1)
    summary = page.inner_text("#compare-summary")
    assert "Done: 4/4" in summary
    # Rows arrived one by one, under a progress bar: some intermediate counts were on screen.
    assert any("/4" in p and "Done" not in p for p in progress), progress
    table = page.inner_text("#compare-results")
    assert table.count("smollm2-135m-instruct:none") == 2 and table.count("smollm2-135m-instruct:4bit") == 2

    page.wait_for_selector("#compare-csv a[download]", timeout=15_000)
    page.wait_for_selector("#compare-jsonl a[download]", timeout=15_000)
    csv_text = page.request.get(page.get_attribute("#compare-csv a[download]", "href")).body().decode("utf-8-sig")
    jsonl_text = page.request.get(page.get_attribute("#compare-jsonl a[download]", "href")).text()
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    records = [json.loads(line) for line in jsonl_text.splitlines() if line.strip()]
    for got in (rows, records):
        assert len(got) == 4
        assert sorted((r["config"], r["question"]) for r in got) == sorted(
            (c, q) for c in ("smollm2-135m-instruct:none", "smollm2-135m-instruct:4bit") for q in questions)
        assert all(r["answer"] and not r["error"] for r in got)
    assert all(float(r["tokens_per_s"]) > 0 and int(r["new_tokens"]) <= 24 for r in rows), rows
    assert all(r["ttft_s"] > 0 and r["peak_mib"] > 0 for r in records)


def test_compare_tab_follows_the_language_switch(page):
    page.click("#language label:has-text('中文')")
    for selector, text in [("#compare-run", "开始对比"), ("#compare-stop", "停止"), ("#compare-batch", "批量运行"),
                           ("#compare-quality-box", "量化的质量代价"), ("#compare-prompt", "提示")]:
        page.wait_for_function(f"document.querySelector('{selector}').innerText.includes('{text}')", timeout=15_000)
    page.click("#language label:has-text('English')")
    page.wait_for_function("document.querySelector('#compare-run').innerText.includes('Compare')", timeout=15_000)
