"""batchrun.airflow in a real Airflow 3 (apache-airflow 3.3.2, installed by scripts/setup_airflow.sh into its own
virtualenv, .venv-airflow, because its pins may conflict with batchrun's).

Each test writes a DAG, runs it with ``airflow dags test`` (a SQLite metadata DB in a temporary AIRFLOW_HOME)
and reads what happened from the run's output and the metadata DB (task states, try numbers, the previous
tries in ``task_instance_history``, XComs). The operator's jobs run with this process's Python (batchrun's
venv), through a wrapper script that counts how often batchrun was started. ``airflow dags test`` runs the
DAG in one process and honours retries: an ``up_for_retry`` task instance is scheduled again (try_number + 1)
once its retry_delay has passed, and a deferred sensor's trigger runs in line.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, write_job

AIRFLOW_VERSION = "3.3.2"
VENV = REPO / ".venv-airflow"
AIRFLOW = VENV / "bin" / "airflow"
DATE = "2026-11-28"  # the logical date of every test run: {{ ds }}
TIMEOUT = 300


# ------------------------------------------------------------------------------------------------ set-up
@pytest.fixture(scope="session")
def airflow_db(tmp_path_factory) -> Path:
    """Airflow installed (scripts/setup_airflow.sh: once, then a no-op) and a migrated SQLite DB to copy."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "setup_airflow.sh")], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (VENV / ".batchrun-airflow").read_text().strip() == f"apache-airflow=={AIRFLOW_VERSION}"
    home = tmp_path_factory.mktemp("airflow-template")
    (home / "dags").mkdir()
    r = subprocess.run([str(AIRFLOW), "db", "migrate"], env=airflow_env(home), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return home / "airflow.db"


def airflow_env(home: Path, dags: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags or home / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", BATCHRUN_PROGRESS_INTERVAL="1", **extra)
    return env


@pytest.fixture()
def home(tmp_path, airflow_db) -> Path:
    """A fresh AIRFLOW_HOME with its own copy of the migrated DB and an empty DAG folder."""
    h = tmp_path / "airflow"
    (h / "dags").mkdir(parents=True)
    shutil.copy(airflow_db, h / "airflow.db")
    return h


@pytest.fixture()
def counting_python(tmp_path) -> tuple[str, Path]:
    """A stand-in for batchrun's python that records each start, then runs this process's interpreter."""
    count = tmp_path / "starts.txt"
    wrapper = tmp_path / "python-counting"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> "{count}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), count


def starts(count: Path) -> int:
    return len(count.read_text().splitlines()) if count.exists() else 0


def tiny_job(tmp_path: Path, model: str, data: Path, extra: str = "") -> Path:
    return write_job(tmp_path, f"""\
name: reviews
model: {{path: "{model}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Review: {{{{ text }}}}"}}
sampling: {{max_tokens: 3{extra}}}
output: {{path: "{tmp_path / 'unused'}"}}
engine: {{device: cpu}}
""")


DAG_HEAD = """\
import json
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, task

from batchrun.airflow import BatchrunOperator, BatchrunSuccessSensor
"""


def write_dag(home: Path, dag_id: str, body: str) -> None:
    src = DAG_HEAD + f"""
with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
""" + "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
    (home / "dags" / f"{dag_id}.py").write_text(src)


def run_op(job: Path, python: str, out: Path, retries: int, retry_delay_s: float = 0, extra: str = "") -> str:
    return (f"run = BatchrunOperator(task_id='run', job={str(job)!r}, python={python!r}, "
            f"overrides={{'output.path': {str(out)!r} + '/{{{{ ds }}}}', 'sampling.max_tokens': 2}}, "
            f"retries={retries}, retry_delay=timedelta(seconds={retry_delay_s}){extra})")


def dags_test(home: Path, dag_id: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(AIRFLOW), "dags", "test", dag_id, DATE], env=airflow_env(home, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)


class Running:
    """``airflow dags test`` in the background; its output is read as it comes."""

    def __init__(self, home: Path, dag_id: str, **env: str):
        self.proc = subprocess.Popen([str(AIRFLOW), "dags", "test", dag_id, DATE], env=airflow_env(home, **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None, f"airflow ended before {text!r}:\n" + "".join(self.lines)[-6000:]
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + "".join(self.lines)[-6000:]
            time.sleep(0.05)

    def finish(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        return rc, "".join(self.lines)


def task_rows(home: Path, dag_id: str) -> dict[str, tuple[str, int]]:
    """task_id -> (state, try_number) of the run's task instances."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ?", (dag_id,))
        return {t: (s, n) for t, s, n in rows}


def earlier_tries(home: Path, dag_id: str, task_id: str) -> list[tuple[int, str]]:
    """(try_number, state) of a task's earlier tries: Airflow copies a try to this table when it is retried,
    with state "failed" (its up_for_retry is not a finished state)."""
    with sqlite3.connect(home / "airflow.db") as db:
        return db.execute("SELECT try_number, state FROM task_instance_history WHERE dag_id = ? AND task_id = ? "
                          "ORDER BY try_number", (dag_id, task_id)).fetchall()


def xcom(home: Path, dag_id: str, task_id: str):
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value'",
                          (dag_id, task_id)).fetchall()
    assert len(rows) == 1, rows
    return json.loads(rows[0][0])


def expected_summary(out: Path) -> dict:
    """The tiny job's summary: 6 rows, one with a null text (a row error), 2 tokens each (the override)."""
    return {"status": "ok", "exit_code": 0, "job": "reviews", "output": str(out / DATE), "rows_total": 6,
            "rows_ok": 5, "rows_error": 1, "rows_skipped": 0, "output_tokens": 10}


# ------------------------------------------------------------------------------------------------ tests
def test_module_imports_only_airflow_and_the_standard_library(airflow_db):
    """Imported in Airflow's venv (no torch, duckdb or batchrun dependencies there), batchrun.airflow loads
    nothing but what Airflow's own modules load, and renders the command it runs."""
    tree = ast.parse((REPO / "batchrun" / "airflow.py").read_text())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots - sys.stdlib_module_names == {"airflow"}
    code = """
import json, sys
from airflow.sdk import BaseOperator, BaseSensorOperator
import airflow.sdk.exceptions, airflow.triggers.base
before = set(sys.modules)
import batchrun.airflow as ba
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] not in sys.stdlib_module_names)
op = ba.BatchrunOperator(task_id="t", job="jobs/x.yaml", fresh=True, python="/py",
                         overrides={"a.b": 4, "c": "out/{{ ds }}", "d": [1, "x"], "e": True, "f": None})
print(json.dumps({"new": new, "cmd": op.command(), "templated": list(op.template_fields),
                  "sensor": list(ba.BatchrunSuccessSensor.template_fields),
                  "has": [m for m in ("torch", "duckdb", "batchrun.api", "batchrun.spec") if m in sys.modules]}))
"""
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120,
                       env=airflow_env(Path(airflow_db).parent))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.splitlines()[-1])
    assert d["new"] == ["batchrun", "batchrun.airflow"]
    assert d["has"] == []
    assert d["cmd"] == ["/py", "-m", "batchrun", "--log-format", "json", "submit", "jobs/x.yaml", "--json",
                        "--set", "a.b=4", "--set", "c=out/{{ ds }}", "--set", 'd=[1, "x"]', "--set", "e=true",
                        "--set", "f=null", "--fresh"]
    assert d["templated"] == ["job", "overrides", "cwd"]
    assert d["sensor"] == ["output_dir"]


def test_success_sensor_and_xcom_summary(tmp_path, home, tiny_model_dir, reviews_parquet, counting_python):
    python, count = counting_python
    job, out, result = tiny_job(tmp_path, tiny_model_dir, reviews_parquet), tmp_path / "out", tmp_path / "pulled.json"
    write_dag(home, "br_success", f"""\
{run_op(job, python, out, retries=2)}
done = BatchrunSuccessSensor(task_id='done', output_dir={str(out)!r} + '/{{{{ ds }}}}', poke_interval=1, timeout=60)

@task
def pull(summary, ds=None):
    Path({str(result)!r}).write_text(json.dumps({{'ds': ds, 'summary': summary}}))

run >> done >> pull(run.output)
""")
    r = dags_test(home, "br_success")
    assert r.returncode == 0, r.stdout[-6000:]
    assert starts(count) == 1
    assert task_rows(home, "br_success") == {"run": ("success", 1), "done": ("success", 1), "pull": ("success", 1)}
    pulled = json.loads(result.read_text())
    assert pulled["ds"] == DATE
    summary = pulled["summary"]
    assert {k: summary[k] for k in expected_summary(out)} == expected_summary(out)
    assert summary == xcom(home, "br_success", "run")  # what the operator returned is what was pulled
    assert xcom(home, "br_success", "done") == str(out / DATE / "_SUCCESS")
    assert (out / DATE / "_SUCCESS").is_file()
    # batchrun's JSON log lines were streamed into the task log, line by line
    assert '"msg": "read 6 rows from 1 file(s)"' in r.stdout
    assert '"event": "progress"' in r.stdout


@pytest.mark.parametrize("case, code", [("unknown_field", 78), ("missing_input", 65), ("missing_job", 2)])
def test_errors_retrying_cannot_fix_fail_at_once(tmp_path, home, tiny_model_dir, reviews_parquet,
                                                  counting_python, case, code):
    python, count = counting_python
    if case == "unknown_field":
        job = tiny_job(tmp_path, tiny_model_dir, reviews_parquet, extra=", bogus_field: 1")
        detail = "sampling.bogus_field"
    elif case == "missing_input":
        job = tiny_job(tmp_path, tiny_model_dir, tmp_path / "nope.parquet")
        detail = "nope.parquet"
    else:
        job, detail = tmp_path / "no-such-job.yaml", "job file not found"
    dag_id = f"br_fail_{case}"
    write_dag(home, dag_id, f"""\
{run_op(job, python, tmp_path / 'out', retries=2)}
after = BatchrunSuccessSensor(task_id='after', output_dir={str(tmp_path / 'out')!r}, poke_interval=1, timeout=5)
run >> after
""")
    r = dags_test(home, dag_id)
    assert r.returncode == 1 and "DagRun failed" in r.stdout, r.stdout[-6000:]
    assert starts(count) == 1  # retries=2, yet batchrun ran once
    assert task_rows(home, dag_id) == {"run": ("failed", 1), "after": ("upstream_failed", 0)}
    assert earlier_tries(home, dag_id, "run") == []
    failure = [line for line in r.stdout.splitlines() if "AirflowFailException" in line]
    assert failure, r.stdout[-6000:]
    assert f"exited {code} (" in r.stdout and "not retried" in r.stdout
    assert detail in r.stdout


def test_a_python_that_does_not_exist_fails_at_once(tmp_path, home):
    write_dag(home, "br_nopython", run_op(tmp_path / "job.yaml", str(tmp_path / "no-venv" / "python"),
                                          tmp_path / "out", retries=2))
    r = dags_test(home, "br_nopython")
    assert r.returncode == 1 and "DagRun failed" in r.stdout, r.stdout[-6000:]
    assert task_rows(home, "br_nopython") == {"run": ("failed", 1)}
    assert earlier_tries(home, "br_nopython", "run") == []
    assert "AirflowFailException: cannot run batchrun: [Errno 2] No such file or directory" in r.stdout


def test_locked_output_is_retried(tmp_path, home, tiny_model_dir, reviews_parquet, counting_python):
    python, count = counting_python
    job, out = tiny_job(tmp_path, tiny_model_dir, reviews_parquet), tmp_path / "out"
    (out / DATE).mkdir(parents=True)
    write_dag(home, "br_locked", run_op(job, python, out, retries=1))
    with open(out / DATE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another batchrun writing there
        r = dags_test(home, "br_locked")
    assert r.returncode == 1 and "DagRun failed" in r.stdout, r.stdout[-6000:]
    assert starts(count) == 2  # the first try and its one retry
    assert task_rows(home, "br_locked") == {"run": ("failed", 2)}
    assert earlier_tries(home, "br_locked", "run") == [(1, "failed")]
    assert "new_state=up_for_retry" in r.stdout, r.stdout[-6000:]
    assert r.stdout.count("exited 75 (temporary failure; Airflow retries while the task has retries left)") == 2
    assert "is locked by another batchrun process" in r.stdout
    assert "AirflowFailException" not in r.stdout
    assert sorted(p.name for p in (out / DATE).iterdir()) == [".lock"]  # nothing written under the lock


def test_locked_output_succeeds_on_retry_once_free(tmp_path, home, tiny_model_dir, reviews_parquet,
                                                   counting_python):
    python, count = counting_python
    job, out = tiny_job(tmp_path, tiny_model_dir, reviews_parquet), tmp_path / "out"
    (out / DATE).mkdir(parents=True)
    write_dag(home, "br_relock", run_op(job, python, out, retries=1, retry_delay_s=3))
    lock = open(out / DATE / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        run = Running(home, "br_relock")
        run.wait_for("exited 75 (temporary failure")
    finally:
        lock.close()  # the other writer is done: the retry (3 s later) gets the directory
    rc, output = run.finish()
    assert rc == 0, output[-6000:]
    assert starts(count) == 2
    assert task_rows(home, "br_relock") == {"run": ("success", 2)}
    assert earlier_tries(home, "br_relock", "run") == [(1, "failed")]
    summary = xcom(home, "br_relock", "run")
    assert {k: summary[k] for k in expected_summary(out)} == expected_summary(out)


def test_deferrable_and_poking_sensors_wait_for_success(tmp_path, home):
    first, second = tmp_path / "first", tmp_path / "second"
    write_dag(home, "br_sensors", f"""\
deferred = BatchrunSuccessSensor(task_id='deferred', output_dir={str(first)!r}, deferrable=True, poke_interval=0.5,
                                 timeout=120)
poking = BatchrunSuccessSensor(task_id='poking', output_dir={str(second)!r}, poke_interval=0.5, timeout=120)
deferred >> poking
""")
    run = Running(home, "br_sensors")
    run.wait_for("[DAG TEST] running trigger in line")  # the sensor deferred: its trigger polls the file
    time.sleep(1)
    first.mkdir()
    (first / "_SUCCESS").touch()
    run.wait_for("waiting for " + str(second / "_SUCCESS"))  # the poking sensor is waiting now
    time.sleep(1.5)
    second.mkdir()
    (second / "_SUCCESS").touch()
    rc, output = run.finish()
    assert rc == 0, output[-6000:]
    assert task_rows(home, "br_sensors") == {"deferred": ("success", 1), "poking": ("success", 1)}
    assert xcom(home, "br_sensors", "deferred") == str(first / "_SUCCESS")
    assert xcom(home, "br_sensors", "poking") == str(second / "_SUCCESS")
    assert "found " + str(first / "_SUCCESS") in output  # the trigger saw it
    assert output.count("waiting for " + str(second / "_SUCCESS")) >= 2  # poked more than once


def test_kill_stops_batchrun_gracefully(tmp_path, home, tiny_model_dir):
    """SIGTERM to the task (what Airflow's supervisor sends to stop a task) calls on_kill, which sends one
    SIGTERM to batchrun: it stops gracefully (manifest: stopped_by SIGTERM, complete false) and exits 75."""
    n = 100
    pq.write_table(pa.table({"id": [f"r{i:03d}" for i in range(n)],
                             "text": [f"Review {i}: it is fine." for i in range(n)]}), tmp_path / "many.parquet")
    job = tiny_job(tmp_path, tiny_model_dir, tmp_path / "many.parquet")
    out = tmp_path / "out"
    write_dag(home, "br_kill", f"""\
run = BatchrunOperator(task_id='run', job={str(job)!r}, python={sys.executable!r},
                       overrides={{'output.path': {str(out)!r}, 'sampling.max_tokens': 200}})
""")
    run = Running(home, "br_kill")
    run.wait_for('"event": "progress"')  # generating
    started = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)
    rc, output = run.finish()
    assert time.monotonic() - started < 60, output[-6000:]
    assert rc == 1 and "DagRun failed" in output, output[-6000:]
    assert "sent SIGTERM to batchrun (pid" in output  # by the watchdog thread: on_kill itself never logs
    assert "exited 75 (temporary failure; Airflow retries while the task has retries left) after on_kill" in output
    assert task_rows(home, "br_kill") == {"run": ("failed", 1)}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["complete"], manifest["stopped_by"]) == (False, "SIGTERM")
    assert not (out / "_SUCCESS").exists()


def test_example_dag(tmp_path, home, smollm2_dir):
    """examples/airflow/batchrun_dag.py as it is, with the real SmolLM2 (4 reviews, 2 tokens each)."""
    out = tmp_path / "out"
    env = dict(BATCHRUN_PYTHON=sys.executable, BATCHRUN_AIRFLOW_OUT=str(out))
    r = subprocess.run([str(AIRFLOW), "dags", "test", "batchrun_example", DATE, "-c",
                        json.dumps({"rows": 4, "max_tokens": 2})],
                       env=airflow_env(home, dags=REPO / "examples" / "airflow", **env),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-6000:]
    assert task_rows(home, "batchrun_example") == {"summarize": ("success", 1), "wait_for_success": ("success", 1),
                                                   "report": ("success", 1)}
    summary = xcom(home, "batchrun_example", "summarize")
    target = out / "review-summaries" / DATE
    assert {k: summary[k] for k in ("status", "job", "output", "rows_total", "rows_ok", "output_tokens")} == {
        "status": "ok", "job": "review-summaries", "output": str(target), "rows_total": 4, "rows_ok": 4,
        "output_tokens": 8}
    assert (target / "_SUCCESS").is_file()
    assert xcom(home, "batchrun_example", "report") == (
        f"review-summaries: 4 rows ok, 0 with errors, 8 output tokens in {summary['elapsed_s']:.1f}s -> {target}")
