"""The persistence handlers (ui/persist.py) without a browser: save guard, restore, import errors, the secret."""

import json
import threading

import gradio as gr
import pytest

from models.engine import Engine
from models.loading import LoadSettings
from ui.chat_file import SavedChat
from ui.handlers import ChatHandlers, ChatSession
from ui.persist import SETTING_KEYS, ChatPersistence, browser_secret

SETTINGS = ["Be brief.", 0.2, 0.5, 200, "full", "drop_oldest", 4096, False]
HISTORY = [{"role": "user", "content": "Hi <b>"}, {"role": "assistant", "content": "Hello"},
           {"role": "assistant", "content": "", "metadata": {"title": "TTFT 0.1 s", "status": "done", "id": None}}]


@pytest.fixture(scope="module")
def persistence(catalog, tiny_llama, tmp_path_factory):
    engine = Engine(catalog, cache_dir=tmp_path_factory.mktemp("cache"))
    engine.load(str(tiny_llama), LoadSettings(context_tokens=256))
    return ChatPersistence(ChatHandlers(engine), engine.cache_dir, max_import_bytes=10_000)


def test_nothing_is_saved_before_the_saved_chat_was_restored(persistence):
    # The page's start-up events must not overwrite the browser's copy with an empty chat.
    assert isinstance(persistence.save(False, [], "m", "none", *SETTINGS), type(gr.skip()))
    saved = persistence.save(True, HISTORY, "m", "none", *SETTINGS)
    assert saved["messages"][2] == {"role": "assistant", "content": "", "metadata": {"title": "TTFT 0.1 s", "status": "done"}}
    assert saved["settings"] == dict(zip(SETTING_KEYS, SETTINGS))


def test_a_typed_non_number_is_left_out_of_the_saved_settings(persistence):
    saved = persistence.save(True, [], "m", "none", "", "abc", 0.5, "", "full", "drop_oldest", 4096, False)
    assert "temperature" not in saved["settings"] and "max_new_tokens" not in saved["settings"]


def test_restore_brings_back_chat_settings_and_model_boxes(persistence):
    saved = SavedChat(HISTORY[:2], "smollm2-135m-instruct", "4bit", dict(zip(SETTING_KEYS, SETTINGS))).to_dict()
    out = persistence.restore(saved, ChatSession(), "en")
    assert out[0] == HISTORY[:2] and out[1:9] == SETTINGS
    assert out[9:11] == ["smollm2-135m-instruct", "4bit"]
    assert out[11] == "Restored your chat from this browser (2 messages)." and out[12] is True


def test_an_unreadable_saved_chat_starts_clean_and_says_so(persistence):
    out = persistence.restore({"format": "smallchat-chat", "version": 1, "messages": "oops"}, ChatSession(), "en")
    assert all(isinstance(o, type(gr.skip())) for o in out[:11]) and out[12] is True
    assert "could not be read" in out[11] and '"messages" must be a list' in out[11]
    out = persistence.restore(None, ChatSession(), "en")  # a first visit: nothing to say
    assert out[11] == "" and out[12] is True


def test_import_refuses_bad_files_and_out_of_range_settings_and_keeps_the_chat(persistence, tmp_path):
    cases = [(b"\x00" * 10_001, "The file is 10,001 bytes; chat imports are limited to 10,000 bytes"),
             (b"{", "not valid JSON"),
             (json.dumps(SavedChat(settings={"temperature": 9.0}).to_dict()).encode(),
              "The chat's setting \"Temperature (0 = greedy)\" is 9.0; it must be from 0 to 2.")]
    for data, says in cases:
        path = tmp_path / "chat.json"
        path.write_bytes(data)
        out = persistence.import_file(str(path), ChatSession(), "en")
        assert all(isinstance(o, type(gr.skip())) for o in out[:-1])  # chat and settings untouched
        assert says in out[-1] and "Your current chat is kept." in out[-1]


def test_import_is_refused_while_an_answer_streams(persistence, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(SavedChat(HISTORY[:2]).to_dict()))
    session = ChatSession()
    session.active = threading.Event()  # answering
    out = persistence.import_file(str(path), session, "en")
    assert isinstance(out[0], type(gr.skip())) and "still being written" in out[-1]
    out = persistence.import_file(str(path), ChatSession(), "en")
    assert out[0] == HISTORY[:2] and out[-1] == "Imported 2 messages from chat.json."


def test_import_says_when_the_chat_was_written_by_another_model(persistence, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(SavedChat(HISTORY[:2], "qwen2.5-7b-instruct", "4bit").to_dict()))
    note = persistence.import_file(str(path), ChatSession(), "en")[-1]
    assert "It was written with qwen2.5-7b-instruct (4bit); the model in use is" in note


def test_export_writes_json_that_imports_back(persistence):
    path = persistence.export("json", HISTORY, "m", "none", *SETTINGS)
    out = persistence.import_file(path, ChatSession(), "en")
    assert out[0] == [{k: v for k, v in m.items() if k != "metadata"} | (
        {"metadata": {"title": "TTFT 0.1 s", "status": "done"}} if "metadata" in m else {}) for m in HISTORY]
    assert persistence.export("md", HISTORY, "m", "none", *SETTINGS).endswith(".md")


def test_the_browser_secret_is_made_once_and_kept(tmp_path):
    first = browser_secret(tmp_path)
    assert len(first) == 32 and browser_secret(tmp_path) == first
    assert (tmp_path / "browser-state.key").stat().st_mode & 0o777 == 0o600
