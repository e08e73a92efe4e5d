#!/usr/bin/env bash
# Set up .venv and run the example job end to end on the default device (CPU here, the real SmolLM2).
# Extra arguments go to `batchrun submit`, e.g. ./scripts/example.sh --fresh --json
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/batchrun submit jobs/example.yaml "$@"
