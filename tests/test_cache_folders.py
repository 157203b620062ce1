"""A cache folder published by one process is never deleted by another publishing the same thing.

CI's two test workers unpacked the embedded GGUF into one fresh cache at once: the second to finish
deleted the first one's folder while the first was reading its tokenizer ("Couldn't instantiate the
backend tokenizer"). These tests pin the rule: the first complete copy wins and stays.
"""

from pathlib import Path

import pytest

from models.cache_folders import move_into_place


def _folder(path: Path, text: str, complete: bool) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    if complete:
        (path / "done").write_text("")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "done").is_file()


def test_a_fresh_folder_is_renamed_into_place(tmp_path):
    tmp = _folder(tmp_path / "x.tmp", "new", complete=True)
    dst = move_into_place(tmp, tmp_path / "x", _is_complete)
    assert (dst / "weights").read_text() == "new" and not tmp.exists()


def test_a_complete_copy_published_first_is_kept_and_ours_removed(tmp_path):
    theirs = _folder(tmp_path / "x", "theirs", complete=True)
    inode = theirs.stat().st_ino
    tmp = _folder(tmp_path / "x.tmp", "ours", complete=True)
    dst = move_into_place(tmp, theirs, _is_complete)
    assert dst.stat().st_ino == inode and (dst / "weights").read_text() == "theirs"
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_stale_copy_is_replaced_and_leaves_nothing_behind(tmp_path):
    _folder(tmp_path / "x", "half-written", complete=False)
    tmp = _folder(tmp_path / "x.tmp", "new", complete=True)
    dst = move_into_place(tmp, tmp_path / "x", _is_complete)
    assert (dst / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the stale copy moved aside is deleted


@pytest.mark.slow
def test_a_second_unpack_of_the_embedded_model_keeps_the_first_ones_folder(catalog, tmp_path):
    # The race, made deterministic: while one unpack is about to write its copy, a second unpack of the
    # same file runs to the end and its folder is opened. The first must then keep that folder, not
    # delete it under its reader, and both return the same, loadable place.
    from transformers import AutoTokenizer

    from models.sources import embedded_gguf_path, unpack_gguf

    gguf = embedded_gguf_path(catalog.get("smollm2-135m-instruct"))
    second = {}

    def first_progress(fraction, message):
        if message.startswith("Writing") and not second:
            second["dst"] = unpack_gguf(gguf, tmp_path)
            second["inode"] = second["dst"].stat().st_ino

    first = unpack_gguf(gguf, tmp_path, first_progress)
    assert first == second["dst"] and first.stat().st_ino == second["inode"]
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.decode(tokenizer.encode("Paris")) == "Paris"
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == [first.name]  # no temporary left
