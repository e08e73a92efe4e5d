#!/usr/bin/env bash
# On the GPU machine, in the repo's copy: SmolLM2 and batchrun's missing dependencies put in place for the
# benchmarks and tests on the real model. The files come from scripts/device_files.sh and are carried in
# three calls (one call carries at most 64 MiB; the machine is released 30 s after a call, so make them
# back to back):
#
#   call 1 (carry .whl .tok .gg/p0):  bash scripts/device_smollm2.sh 1
#   call 2 (carry .gg/p1 .gg/p3):     bash scripts/device_smollm2.sh 2
#   call 3 (carry .gg/p2 .whl .tok):  BATCHRUN_COMMIT=<hash> bash scripts/device_smollm2.sh 3 && . /tmp/gg/env.sh && CMD
#
# (The machine's copy of the repo has no .git: BATCHRUN_COMMIT names the commit in the result files.)
#
# /tmp/gg/env.sh sets GGUF (the model file), PYTHONPATH (the wheels and the repo), BATCHRUN_TEST_TOKENIZER,
# BATCHRUN_COMMIT, and Q960, Q512, Q256: the example's 960 rows (four variants of each English review) and
# the first 512 or 256 of them, for input.sql. For example, the mask cost at 960 rows:
#   python3 benchmarks/constraint_gpu.py --job examples/extract.yaml --set engine.device=cuda \
#     --set model.path=$GGUF --set "input.sql=$Q960" --phases --out $OUT/c.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
GG="${BATCHRUN_DEVICE_DIR:-/tmp/gg}"
SITE="${BATCHRUN_DEVICE_SITE:-/tmp/site}"
wheels() {
  [ -d "$SITE/duckdb" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
}
case "${1:-}" in
  1)
    wheels
    mkdir -p "$GG" && cp .gg/p0 "$GG"/ ;;
  2)
    mkdir -p "$GG" && cp .gg/p1 .gg/p3 "$GG"/ ;;
  3)
    model="$GG/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -f "$model" ]; then
      for p in p0 p1 p3; do
        if [ ! -f "$GG/$p" ]; then
          echo "device_smollm2.sh: $GG/$p is missing: make calls 1 and 2 first, back to back" >&2
          exit 2
        fi
      done
      cat "$GG"/p0 "$GG"/p1 .gg/p2 "$GG"/p3 > "$model.part" && mv "$model.part" "$model"
      rm -f "$GG"/p0 "$GG"/p1 "$GG"/p3
    fi
    wheels
    q="SELECT review_id || '-' || i AS review_id, product, label, CASE WHEN i = 0 THEN text ELSE 'Review ' || i"
    q="$q || '. ' || text END AS text FROM input CROSS JOIN range(4) t(i) WHERE lang = 'en'"
    commit="${BATCHRUN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    {
      printf 'export GGUF=%q PYTHONPATH=%q BATCHRUN_TEST_TOKENIZER=%q PYTHONUNBUFFERED=1\n' \
        "$model" "$SITE:$PWD" "$PWD/.tok"
      printf 'export BATCHRUN_COMMIT=%q Q960=%q Q512=%q Q256=%q\n' "$commit" "$q" "$q LIMIT 512" "$q LIMIT 256"
    } > "$GG/env.sh"
    echo "device_smollm2.sh: ready (. $GG/env.sh)" ;;
  *)
    echo "usage: bash scripts/device_smollm2.sh 1 | 2 | 3" >&2
    exit 2 ;;
esac
