#!/usr/bin/env bash
# Set up .venv-airflow: a real Airflow 3 in its own virtualenv (its pins may conflict with batchrun's), with
# batchrun installed --no-deps so that DAGs can import batchrun.airflow (standard library + Airflow only).
# Jobs still run with batchrun's own venv: BatchrunOperator(python=".venv/bin/python").
# Idempotent: a marker file records what was installed; a second run does nothing (delete .venv-airflow to
# reinstall). BATCHRUN_AIRFLOW chooses another Airflow (default apache-airflow==3.3.2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
AIRFLOW=${BATCHRUN_AIRFLOW:-apache-airflow==3.3.2}
VENV=.venv-airflow
MARKER=$VENV/.batchrun-airflow
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$AIRFLOW" ] && [ -x "$VENV/bin/airflow" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_airflow: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
pip() {  # quiet, without the local pip configuration's notes about missing index folders; keeps pip's status
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
}
echo "setup_airflow: installing $AIRFLOW into $VENV (a minute or two the first time)" >&2
rm -f "$MARKER"
pip install "$AIRFLOW"
pip install --no-deps -e .
"$VENV/bin/python" -c "import airflow, batchrun.airflow" || { echo "setup_airflow: install failed" >&2; exit 1; }
echo "$AIRFLOW" > "$MARKER"
echo "setup_airflow: $("$VENV/bin/airflow" version 2>/dev/null | tail -1) ready in $VENV" >&2
