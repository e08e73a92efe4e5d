"""An Airflow 3 DAG that runs the repository's example job (jobs/example.yaml: SmolLM2 summarizes product
reviews) once a day, waits for the output's ``_SUCCESS`` and reads the job's summary from XCom.

Airflow and batchrun may live in different virtualenvs (Airflow's pins may conflict with batchrun's): this file
needs only ``batchrun.airflow`` importable in Airflow's environment (``pip install --no-deps batchrun``, or
``scripts/setup_airflow.sh`` here), while the job runs with ``BATCHRUN_PYTHON`` (default: this repository's
``.venv/bin/python``, which ``scripts/setup.sh`` creates). Try it::

    scripts/setup.sh && scripts/setup_airflow.sh
    export AIRFLOW_HOME=/tmp/airflow AIRFLOW__CORE__DAGS_FOLDER=$PWD/examples/airflow AIRFLOW__CORE__LOAD_EXAMPLES=False
    .venv-airflow/bin/airflow db migrate
    .venv-airflow/bin/airflow dags test batchrun_example -c '{"rows": 16, "max_tokens": 8}'

Each run writes ``out/airflow/review-summaries/<ds>`` (``BATCHRUN_AIRFLOW_OUT`` moves ``out/airflow``). The
sensor is deferrable: in a deployment it waits in the triggerer (``airflow triggerer``, which ``airflow
standalone`` starts), not in a worker slot; ``airflow dags test`` runs its trigger in line.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task

from batchrun.airflow import BatchrunOperator, BatchrunSuccessSensor

REPO = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("BATCHRUN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
OUT = os.environ.get("BATCHRUN_AIRFLOW_OUT", str(REPO / "out" / "airflow"))
OUTPUT = f"{OUT}/review-summaries/{{{{ ds }}}}"  # one output directory per logical date

with DAG(
    dag_id="batchrun_example",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "rows": Param(240, type="integer", minimum=1, description="how many reviews to summarize"),
        "max_tokens": Param(8, type="integer", minimum=1, description="at most this many tokens a summary"),
    },
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},  # only exit 75 (and 1) is retried
    tags=["batchrun"],
) as dag:
    summarize = BatchrunOperator(
        task_id="summarize",
        job="jobs/example.yaml",
        cwd=str(REPO),  # the job's relative paths (input, model cache) resolve from here
        python=PYTHON,
        overrides={
            "output.path": OUTPUT,
            "sampling.max_tokens": "{{ params.max_tokens }}",
            "input.sql": "SELECT * FROM input WHERE lang = 'en' ORDER BY review_id LIMIT {{ params.rows }}",
            "engine.device": "cpu",
        },
        execution_timeout=timedelta(hours=2),
    )

    done = BatchrunSuccessSensor(task_id="wait_for_success", output_dir=OUTPUT, deferrable=True, poke_interval=5,
                                 timeout=600)

    @task
    def report(summary: dict) -> str:
        """Read the job's summary (the operator's XCom return_value) and say what the run did."""
        line = (f"{summary['job']}: {summary['rows_ok']} rows ok, {summary['rows_error']} with errors, "
                f"{summary['output_tokens']} output tokens in {summary['elapsed_s']:.1f}s -> {summary['output']}")
        print(line)
        return line

    summarize >> done >> report(summarize.output)
