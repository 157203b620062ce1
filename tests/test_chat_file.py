"""The chat file format (ui/chat_file.py): lossless round trips, Markdown, and every malformed input refused clearly."""

import json

import pytest

from ui.chat_file import (MAX_IMPORT_BYTES, MAX_MESSAGES, ChatFileError, SavedChat, clean_messages, from_dict, from_json,
                          to_json, to_markdown)

CHAT = SavedChat(
    messages=[
        {"role": "user", "content": "<script>alert(1)</script> **not bold**\n\tindented 中文 😀"},
        {"role": "assistant", "content": "Paris is the capital of **France**."},
        {"role": "assistant", "content": "", "metadata": {"title": "TTFT 0.12 s · 30.1 tok/s · 9 tokens", "status": "done"}},
        {"role": "user", "content": "x" * 60, "metadata": {"title": "Not sent (too long)", "id": "unsent", "status": "done"}},
        {"role": "assistant", "content": "", "metadata": {"title": "✂️ Context full", "log": "dropped 2", "duration": 0.5}},
    ],
    model="smollm2-135m-instruct", quant="4bit",
    settings={"system_prompt": "Be brief.", "temperature": 0.2, "top_p": 0.5, "max_new_tokens": 200,
              "kv_precision": "full", "overflow": "drop_oldest", "context_tokens": 4096, "double_quant": False},
)


def valid(**changes) -> dict:
    return {**CHAT.to_dict(), **changes}


def test_json_round_trip_is_lossless():
    text = to_json(CHAT)
    assert from_json(text) == CHAT
    assert from_json(text.encode("utf-8")) == CHAT
    assert json.loads(text)["format"] == "smallchat-chat" and json.loads(text)["version"] == 1
    assert from_dict(json.loads(to_json(from_json(text)))) == CHAT  # and again


def test_clean_messages_drops_gradios_empty_metadata_fields_only():
    history = [{"role": "assistant", "content": "", "metadata": {"title": "T", "id": None, "parent_id": None,
                                                                 "duration": None, "status": "done", "extra": 1}},
               {"role": "user", "content": "hi", "metadata": {}}]
    assert clean_messages(history) == [{"role": "assistant", "content": "", "metadata": {"title": "T", "status": "done"}},
                                       {"role": "user", "content": "hi"}]


def test_markdown_has_the_turns_the_notes_and_the_settings():
    md = to_markdown(CHAT)
    assert md.startswith("# Chat (Small LLM Lab)")
    assert "- Model: `smollm2-135m-instruct` (4bit)" in md and "temperature 0.2" in md
    assert "> Be brief." in md
    assert "**You**\n\n<script>alert(1)</script> **not bold**" in md
    assert "**Assistant**\n\nParis is the capital of **France**." in md
    assert "> *TTFT 0.12 s · 30.1 tok/s · 9 tokens*" in md
    assert "**You** (Not sent (too long))" in md
    assert "> *✂️ Context full — dropped 2*" in md


@pytest.mark.parametrize("data, says", [
    (b"{not json", "not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
    (b"\xff\xfe{}", "not UTF-8 text (bad byte at position 0)"),
    (b"[]", 'not a Small LLM Lab chat: expected a JSON object with "format": "smallchat-chat"'),
    (json.dumps({"format": "other"}).encode(), "not a Small LLM Lab chat"),
    (json.dumps(valid(version=2)).encode(), "Unsupported chat version 2"),
    (json.dumps(valid(version="1")).encode(), "Unsupported chat version '1'"),
    (json.dumps(valid(extra=1)).encode(), "Unknown field 'extra' at the top level"),
    (json.dumps(valid(messages={"role": "user"})).encode(), '"messages" must be a list'),
    (json.dumps(valid(messages=["hi"])).encode(), "message 1 must be an object"),
    (json.dumps(valid(messages=[{"role": "system", "content": "x"}])).encode(),
     'message 1: "role" must be "user" or "assistant" (got \'system\')'),
    (json.dumps(valid(messages=[{"role": "user", "content": 5}])).encode(), "message 1's content must be text (got int)"),
    (json.dumps(valid(messages=[{"role": "user", "content": ["a"]}])).encode(), "message 1's content must be text"),
    (json.dumps(valid(messages=[{"role": "user", "content": "a", "name": "x"}])).encode(), "message 1: unknown field 'name'"),
    (json.dumps(valid(messages=[{"role": "user", "content": "a", "metadata": []}])).encode(), '"metadata" must be an object'),
    (json.dumps(valid(messages=[{"role": "user", "content": "a", "metadata": {"title": 3}}])).encode(),
     "message 1's metadata 'title' must be text (got int 3)"),
    (json.dumps(valid(messages=[{"role": "user", "content": "a", "metadata": {"status": "busy"}}])).encode(),
     'metadata "status" must be "pending" or "done"'),
    (json.dumps(valid(messages=[{"role": "user", "content": "a\x07b"}])).encode(),
     "message 1's content contains a control character (U+0007) at position 1"),
    (json.dumps(valid(messages=[{"role": "user", "content": "a\x00"}])).encode(), "control character (U+0000)"),
    (json.dumps(valid(messages=[{"role": "user", "content": "a\x1b[31m"}])).encode(), "control character (U+001B)"),
    (b'{"format": "smallchat-chat", "version": 1, "messages": [{"role": "user", "content": "\\ud800"}]}',
     "control character (U+D800)"),
    (json.dumps(valid(settings=[1])).encode(), '"settings" must be an object'),
    (json.dumps(valid(settings={"temperature": "hot"})).encode(), 'setting "temperature" must be a number (got str "hot")'),
    (json.dumps(valid(settings={"temperature": True})).encode(), 'setting "temperature" must be a number (got bool true)'),
    (json.dumps(valid(settings={"max_new_tokens": 1.5})).encode(), 'setting "max_new_tokens" must be a whole number'),
    (json.dumps(valid(settings={"seed": 1})).encode(), "Unknown setting 'seed'"),
    (json.dumps(valid(settings={"system_prompt": "\x0c"})).encode(), 'setting "system_prompt" contains a control character'),
    (json.dumps(valid(model=["x"])).encode(), '"model" must be text (got list)'),
])
def test_malformed_chats_are_refused_with_a_message_saying_what_and_where(data, says):
    with pytest.raises(ChatFileError) as e:
        from_json(data)
    assert says in str(e.value)


def test_oversize_and_too_many_messages_are_refused_with_the_limit_named():
    with pytest.raises(ChatFileError, match=r"The file is 4,194,305 bytes; chat imports are limited to 4,194,304 bytes \(4 MiB\)"):
        from_json(b" " * (MAX_IMPORT_BYTES + 1))
    many = valid(messages=[{"role": "user", "content": ""}] * (MAX_MESSAGES + 1))
    with pytest.raises(ChatFileError, match="10,001 messages; at most 10,000"):
        from_dict(many)


def test_tabs_newlines_and_a_utf8_bom_are_fine():
    chat = from_json(b"\xef\xbb\xbf" + json.dumps(valid(messages=[{"role": "user", "content": "a\tb\r\nc"}])).encode())
    assert chat.messages == [{"role": "user", "content": "a\tb\r\nc"}]
