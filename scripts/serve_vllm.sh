#!/usr/bin/env bash
# Serve a model with vLLM on NVIDIA GPUs as an OpenAI-compatible server, for the app's remote backend
# (model box / --model / Compare: openai:http://HOST:PORT/v1#NAME). For a real GPU machine; CI tests the
# same path on the CPU with scripts/vllm_cpu.sh. Not run on a GPU by this project yet.
#
#   bash scripts/serve_vllm.sh MODEL [--tp N] [--port P] [--host H] [--name NAME] [-- more vLLM args]
#
# MODEL is what the app takes: a catalog id, a local folder, a .gguf file or a hub id. The app resolves
# it (models/sources.py): an InternLM2/2.5 entry or folder becomes the Llama-format folder our
# conversion writes (models/internlm2.py), so vLLM serves it as plain Llama WITHOUT --trust-remote-code;
# the embedded model becomes its unpacked safetensors folder; other hub ids are passed on as they are.
# --tp N spreads each layer over N GPUs of this machine (tensor parallel). Several machines: see README
# ("Scale out"): start Ray on each, then run this on the head node with --tp GPUS_PER_NODE
# -- --pipeline-parallel-size NODES --distributed-executor-backend ray.
# Listens on 127.0.0.1 by default; with --host 0.0.0.0 also pass -- --api-key KEY and give the app
# the key in SMALLCHAT_REMOTE_API_KEY.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?usage: bash scripts/serve_vllm.sh MODEL [--tp N] [--port P] [--host H] [--name NAME] [-- vLLM args]}
shift
TP=1 PORT=8000 HOST=127.0.0.1 NAME=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tp) TP=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (vLLM's own options go after --)" >&2; exit 2 ;;
  esac
done
VENV=${VLLM_VENV:-.venv-vllm-gpu}
APP_PY=${APP_PY:-.venv/bin/python}

# vLLM pins its own torch and transformers: it gets its own venv, never the app's.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${VLLM_SPEC:-vllm}"
fi

TARGET=$("$APP_PY" -c "import sys; from models.catalog import load_catalog; from models.sources import resolve_local
print(resolve_local(load_catalog().resolve(sys.argv[1])).location)" "$MODEL")
NAME=${NAME:-$(basename "$MODEL")}
echo "serving $TARGET as $NAME; connect the app with: --model openai:http://$HOST:$PORT/v1#$NAME" >&2
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$TARGET" --served-model-name "$NAME" \
  --host "$HOST" --port "$PORT" --tensor-parallel-size "$TP" "$@"
