"""Issue 12 in real Chromium: typed HTML shows as text, refused numbers, Chinese labels."""

import pytest

pytestmark = pytest.mark.slow

PAYLOAD = "<script>alert(1)</script> <img src=x onerror=alert(2)> <svg onload=alert(3)>"


@pytest.fixture()
def page(browser, app_url):
    context = browser.new_context(locale="en-US", viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#message textarea", timeout=60_000)
    yield page
    context.close()


def test_typed_html_shows_as_the_literal_text_and_fetches_nothing(page):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.fill("#message textarea", PAYLOAD)
    page.press("#message textarea", "Enter")
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('<svg onload=alert(3)>')",
                           timeout=60_000)
    page.click("#stop")  # the model's own answer is not what this test is about
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('TTFT')", timeout=120_000)
    assert PAYLOAD in page.inner_text("#chatbot")
    assert page.locator("#chatbot img, #chatbot svg[onload], #chatbot script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert not [u for u in requests if u.rstrip("/").endswith("/x")], requests
    # Its copy button would copy the escaped form, so the user's own messages have none.
    user_copy = page.locator("#chatbot .message-buttons-right button[aria-label='Copy message']")
    assert user_copy.count() == 0 or not user_copy.first.is_visible()


def test_max_new_tokens_zero_is_refused_and_the_message_stays(page):
    page.click("#settings")  # the accordion holding the generation settings
    box = page.locator("#max-new-tokens input[type='number']")
    box.wait_for(timeout=15_000)
    page.fill("#message textarea", "What is the capital of France?")
    box.fill("0")
    box.press("Enter")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('Max new tokens must be')",
                           timeout=60_000)
    assert page.input_value("#message textarea") == "What is the capital of France?"
    page.wait_for_timeout(2_000)
    assert "TTFT" not in page.inner_text("#chatbot")  # nothing was generated


def test_the_chats_own_trash_icon_is_hidden_and_clear_refuses_while_streaming(page):
    page.fill("#message textarea", "Write a very long story about a dragon who learns to cook.")
    page.press("#message textarea", "Enter")
    page.wait_for_function("document.querySelector('#chatbot').innerText.split(/\\s+/).length > 25", timeout=60_000)
    trash = page.locator("#chatbot button[aria-label='Clear']")
    assert trash.count() == 0 or not trash.first.is_visible()
    page.click("#clear")
    page.wait_for_selector("text=An answer is still being written", timeout=15_000)
    assert "dragon" in page.inner_text("#chatbot")
    page.click("#stop")
    page.wait_for_function("document.querySelector('#chatbot').innerText.includes('stopped')", timeout=60_000)
    page.click("#clear")
    page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('dragon')", timeout=30_000)


def test_chinese_mode_translates_the_language_label_cpu_name_and_quant_reason(page):
    page.click("#language label:has-text('中文')")
    page.wait_for_function("document.querySelector('#language').innerText.includes('语言')", timeout=30_000)
    page.wait_for_function("document.querySelector('#memory').innerText.includes('CPU（未检测到 CUDA 显卡）')",
                           timeout=30_000)
    assert "no CUDA GPU found" not in page.inner_text("#memory")
    body = page.inner_text("body")
    assert "4bit-fast（int4）需要 CUDA 显卡" in body and "needs a CUDA GPU" not in body
    page.click("button[role='tab']:has-text('对比')")
    page.click("#compare-batch")  # the accordion holding the results table
    page.wait_for_function("document.querySelector('#compare-results') && "
                           "document.querySelector('#compare-results').innerText.includes('配置')", timeout=30_000)
