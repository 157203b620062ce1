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
