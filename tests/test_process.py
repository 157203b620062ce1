"""Process-wide settings for the server: glibc's malloc arenas are capped unless the user chose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLY = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from models.process import limit_malloc_arenas; " \
        "print(limit_malloc_arenas())"


def applied(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", APPLY], capture_output=True, text=True, env=env, timeout=60,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_arena_cap_applies_unless_the_environment_sets_one():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert applied(env) == "True"
    assert applied({**env, "MALLOC_ARENA_MAX": "4"}) == "False"  # the user's own setting wins
