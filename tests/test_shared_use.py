"""Issue 12 (shared use): typed HTML shown as text, private endpoints, input checks, failed loads."""

import gradio as gr
import pytest

from ui import chat_history as ch
from ui.chatbot import ChatHistoryData, LiteralChatbot

PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "```\n<div>code</div>\n```\n  indented **bold** &lt; \\\\ \\< $$x$$",
]


@pytest.mark.parametrize("text", PAYLOADS + ["plain words", ""])
def test_literal_markdown_round_trips_and_hides_every_tag(text):
    shown = ch.to_literal_markdown(text)
    assert ch.is_literal_markdown(shown)
    assert ch.from_literal_markdown(shown) == text
    # No unescaped "<", backtick or "$$" is left for Markdown, HTML or LaTeX to act on.
    assert "<" not in shown.replace("\\<", "") and "`" not in shown.replace("\\`", "") and "$$" not in shown


def test_raw_text_from_an_api_client_is_kept_as_is():
    assert ch.from_literal_markdown("What is 2+2? <b>") == "What is 2+2? <b>"


def test_the_chatbot_escapes_user_messages_for_the_browser_and_unescapes_them_for_handlers():
    bot = LiteralChatbot()
    history = [{"role": "user", "content": PAYLOADS[1]}, {"role": "assistant", "content": "**Hi** <b>x</b>"},
               {"role": "user", "content": "  indented\n  twice"}]
    wire = bot.postprocess(history)
    texts = [m.content[0].text for m in wire.root]
    assert texts[0] == ch.to_literal_markdown(PAYLOADS[1])
    assert texts[1] == "**Hi** <b>x</b>"  # answers stay Markdown (Gradio sanitizes them)
    back = bot.preprocess(ChatHistoryData.model_validate(wire.model_dump()))
    assert [ch.content_text(m["content"]) for m in back] == [PAYLOADS[1], "**Hi** <b>x</b>", "  indented\n  twice"]


def test_the_history_format_accepts_plain_strings_and_refuses_garbage_clearly():
    data = ChatHistoryData.model_validate([{"role": "user", "content": "Hi"}])
    assert data.root[0].content[0].text == "Hi"
    for bad in ["Hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], ["x"]]:
        with pytest.raises(gr.Error) as e:
            ChatHistoryData.model_validate(bad)
        assert "message" in str(e.value).lower() or "content" in str(e.value)


@pytest.mark.slow
def test_only_the_chat_is_public_api_and_it_explains_bad_input(app_url, embedded_engine):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/answer"}
    before = embedded_engine.loaded
    for name in ("/load", "/fit_check", "/memory", "/compare", "/compare_batch", "/quality_check", "/load_2"):
        with pytest.raises(Exception):
            client.predict("smollm2-135m-instruct", "4bit", False, None, 512, "en", api_name=name)
    # Not over plain HTTP either.
    import httpx

    reply = httpx.post(f"{app_url}gradio_api/call/load", json={"data": ["smollm2-135m-instruct", "4bit", False, None, 512, "en"]})
    assert reply.status_code == 404 and "not part of this app's API" in reply.text, reply.text
    assert embedded_engine.loaded is before  # nothing was switched by an API caller
    # Plain-string content (OpenAI style) is accepted ...
    history = client.predict([{"role": "user", "content": "What is the capital of France?"}], api_name="/answer")
    assert any("Paris" in str(m["content"]) for m in history if m["role"] == "assistant")
    # ... and a malformed history gets a sentence, not "upstream Gradio app has raised an exception".
    with pytest.raises(Exception) as e:
        client.predict([{"role": "user", "content": 42}], api_name="/answer")
    assert "content must be a string or a list of parts" in str(e.value)
