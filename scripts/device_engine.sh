#!/usr/bin/env bash
# On the GPU machine, in the repo's copy: the engine measurements of the GPU engine issue, one phase a call
# (each fits one device call of at most 600 s; carry .whl and .tok, from scripts/device_files.sh). Results go
# to $OUT (the device tool brings them back); append them to benchmarks/results/ with a note.
#
#   BATCHRUN_COMMIT=<hash> bash scripts/device_engine.sh tests   # GPU equality tests, every attention variant
#   BATCHRUN_COMMIT=<hash> bash scripts/device_engine.sh first   # the first run of a process vs the next ones
#   BATCHRUN_COMMIT=<hash> bash scripts/device_engine.sh tiles   # the paged kernel's tile settings
#   BATCHRUN_COMMIT=<hash> bash scripts/device_engine.sh ab      # engine variants on 1b fewshot, four seeds
#
# (The machine's copy of the repo has no .git: BATCHRUN_COMMIT names the commit in the result files.)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  tests|first|tiles|ab) ;;
  *) echo "usage: bash scripts/device_engine.sh tests|first|tiles|ab" >&2; exit 2 ;;
esac
SITE="${BATCHRUN_DEVICE_SITE:-/tmp/site}"
[ -d "$SITE/duckdb" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD" BATCHRUN_TEST_TOKENIZER="$PWD/.tok"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
case "${1:-}" in
  tests)
    log="$OUT/gpu-tests-engine-${BATCHRUN_COMMIT:-unknown}.log"
    echo "python3 -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_engine.py tests/test_constraints.py" \
      "tests/test_loader.py" \
      "# commit ${BATCHRUN_COMMIT:-unknown}, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" > "$log"
    timeout 540 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_fused.py tests/test_engine.py \
      tests/test_constraints.py tests/test_loader.py >> "$log" 2>&1 || true
    tail -25 "$log" ;;
  first)
    timeout 250 python3 benchmarks/first_run.py --model 1b --workload fewshot --scale 0.25 --seed 4 --runs 3 \
      --out "$OUT/first-run.jsonl" | grep -v '^{'
    BATCHRUN_STEP_BUCKETS=0 BATCHRUN_CAPTURE_AFTER=2 timeout 250 python3 benchmarks/first_run.py --model 1b \
      --workload fewshot --scale 0.25 --seed 4 --runs 2 --out "$OUT/first-run-previous.jsonl" | grep -v '^{' ;;
  tiles)
    timeout 540 python3 benchmarks/paged_tiles.py --model 1b --workload fewshot --scale 0.25 --seed 4 \
      --out "$OUT/paged-tiles.jsonl" | cut -c 1-400 ;;
  ab)  # (a process each: the first run of a process is what a job gets)
    for seed in 4 5 7 8; do
      for system in batchrun batchrun_narrowcausal; do
        timeout 120 python3 benchmarks/gpu_bench.py --models 1b --workloads fewshot --scale 0.25 --seed $seed \
          --systems $system --out "$OUT/ab.jsonl" | grep '^{' | cut -c 150-420
      done
    done
    for system in batchrun_previous hf_padded; do
      timeout 120 python3 benchmarks/gpu_bench.py --models 1b --workloads fewshot --scale 0.25 --seed 5 \
        --systems $system --out "$OUT/ab.jsonl" | grep '^{' | cut -c 150-420
    done ;;
esac
