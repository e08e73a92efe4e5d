"""Several workers (engine.devices, engine.executor: ray): the dataset equals a one-worker run row by row; a
worker killed mid-run has its rows rerun by another, each written once; a driver killed with SIGKILL leaves
no worker behind and resumes to the same dataset; SIGTERM stops every worker (exit 75)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.errors import SpecError
from batchrun.runtime.shard_worker import FAILPOINT
from helpers import REPO, write_job

JOB = """
name: workers
model: {{path: "{model}", dtype: float32}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Shared instruction for every review: say what you think. {{{{ text }}}}", chat: false}}
sampling: {{max_tokens: {max_tokens}, ignore_eos: true{sampling}}}
output: {{path: "{out}", part_rows: {part_rows}}}
engine: {{{engine}, step_tokens: 64, kv_budget_tokens: 4096}}
"""

COLUMNS = "id, output, output_tokens, finish_reason, error"


def _data(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "data.parquet"
    if not path.exists():
        words = ["kettle", "charger", "lamp", "mat", "grinder", "earbuds", "fine", "broke", "great"]
        texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)) for i in range(n)]
        pq.write_table(pa.table({"id": list(range(n)), "text": texts}), path)
    return path


def _job(tmp_path: Path, model: str, out: str, engine: str, n: int = 24, max_tokens: int = 6, part_rows: int = 4,
         sampling: str = "") -> Path:
    return write_job(tmp_path, JOB.format(model=model, data=_data(tmp_path, n), out=tmp_path / out,
                                          max_tokens=max_tokens, part_rows=part_rows, engine=engine,
                                          sampling=sampling), f"{out}.yaml")


def _rows(out: Path, columns: str = COLUMNS) -> list[tuple]:
    return duckdb.sql(f"SELECT {columns} FROM '{out}/*.parquet' ORDER BY id").fetchall()


def _manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


@pytest.mark.parametrize("sampling", ["", ", temperature: 0.9, top_p: 0.9, seed: 7"], ids=["greedy", "sampled"])
def test_two_local_workers_equal_one(tmp_path, tiny_model_dir, sampling):
    one = api.submit(_job(tmp_path, tiny_model_dir, "one", "device: cpu", sampling=sampling))
    two = api.submit(_job(tmp_path, tiny_model_dir, "two", "devices: [cpu, cpu]", sampling=sampling))
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    assert one.rows_total == two.rows_total == 24 and two.rows_ok == 24
    m = _manifest(tmp_path / "two")
    assert m["model"]["device"] == ["cpu", "cpu"] and m["model"]["dtype"] == "float32"
    w = m["workers"]
    assert w["executor"] == "local" and w["devices"] == ["cpu", "cpu"] and w["reruns"] == 0
    assert sum(r["rows"] for r in w["workers"]) == 24
    assert sorted(s for r in w["workers"] for s in r["shards"]) == list(range(w["shards"]))
    assert two.workers == w


@pytest.mark.slow
def test_two_local_workers_equal_one_on_smollm2(tmp_path, smollm2_dir):
    one = _job(tmp_path, smollm2_dir, "one", "device: cpu", n=12, max_tokens=8)
    two = _job(tmp_path, smollm2_dir, "two", "devices: [cpu, cpu]", n=12, max_tokens=8)
    api.submit(one)
    api.submit(two)
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")


def test_a_killed_worker_has_its_shard_rerun_each_row_once(tmp_path, tiny_model_dir, monkeypatch):
    api.submit(_job(tmp_path, tiny_model_dir, "one", "device: cpu", n=40))
    monkeypatch.setenv(FAILPOINT, "0")  # the worker that takes shard 0 dies after handing over its first rows
    result = api.submit(_job(tmp_path, tiny_model_dir, "two", "devices: [cpu, cpu]", n=40))
    out = tmp_path / "two"
    assert _rows(out) == _rows(tmp_path / "one")
    assert len(duckdb.sql(f"SELECT DISTINCT id FROM '{out}/*.parquet'").fetchall()) == result.rows_total == 40
    w = _manifest(out)["workers"]
    assert w["reruns"] == 1
    lost = [r for r in w["workers"] if r["state"] == "lost"]
    assert len(lost) == 1 and "killed by signal 9" in lost[0]["lost"]
    assert (out / "_SUCCESS").exists()


def test_parts_are_named_per_shard(tmp_path, tiny_model_dir):
    api.submit(_job(tmp_path, tiny_model_dir, "two", "devices: [cpu, cpu]", n=40))
    out = tmp_path / "two"
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts and all("-s" in p for p in parts)
    for p in parts:  # each part holds one shard's rows
        shard = int(p.split("-s")[1].split(".")[0])
        assert 0 <= shard < _manifest(out)["workers"]["shards"]


def _submit(job: Path, *args: str, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "batchrun", "--log-format", "json", "submit", str(job), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers_of(pid: int) -> list[int]:
    """The pool's processes under the driver ``pid``: its zygote and the workers the zygote forked."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = [(int(line.split()[0]), int(line.split()[1])) for line in out.splitlines()
             if "batchrun.runtime.local_pool" in line]
    zygotes = {p for p, parent in procs if parent == pid}
    return sorted(zygotes | {p for p, parent in procs if parent in zygotes})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # (a zombie is gone too)
        return f.read().split(") ")[-1][0] != "Z"


def _wait_for(check, timeout: float = 120, what: str = "") -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_driver_killed_leaves_no_worker_and_resumes_to_the_same_dataset(tmp_path, tiny_model_dir):
    api.submit(_job(tmp_path, tiny_model_dir, "one", "device: cpu", n=160, max_tokens=24))
    job = _job(tmp_path, tiny_model_dir, "two", "devices: [cpu, cpu]", n=160, max_tokens=24)
    out = tmp_path / "two"
    p = _submit(job)
    _wait_for(lambda: out.is_dir() and any(out.glob("part-*.parquet")), what="a part")
    _wait_for(lambda: len(_workers_of(p.pid)) == 3, what="the zygote and two workers")
    workers = _workers_of(p.pid)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    _wait_for(lambda: not any(_alive(w) for w in workers), timeout=30, what="the workers to exit")
    assert not (out / "_SUCCESS").exists()
    p = _submit(job, "--json")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert _rows(out) == _rows(tmp_path / "one")
    assert json.loads(stdout.strip().splitlines()[-1])["rows_skipped"] > 0


def test_sigterm_stops_every_worker_with_75_then_resumes(tmp_path, tiny_model_dir):
    api.submit(_job(tmp_path, tiny_model_dir, "one", "device: cpu", n=160, max_tokens=24))
    job = _job(tmp_path, tiny_model_dir, "two", "devices: [cpu, cpu]", n=160, max_tokens=24)
    out = tmp_path / "two"
    p = _submit(job, "--json")
    _wait_for(lambda: out.is_dir() and any(out.glob("part-*.parquet")), what="a part")
    workers = _workers_of(p.pid)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 75, stderr[-3000:]
    assert not any(_alive(w) for w in workers)
    m = _manifest(out)
    assert m["complete"] is False and m["stopped_by"] == "SIGTERM"
    p = _submit(job, "--json")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert _rows(out) == _rows(tmp_path / "one")


def test_batchprompt_with_devices_is_a_spec_error(tmp_path):
    from batchrun.spec import validate_dict

    with pytest.raises(SpecError) as ei:
        validate_dict({"name": "x", "model": {"path": "m"}, "input": {"path": "a.csv"},
                       "prompt": {"template": "{{ a }}"}, "output": {"path": "o"}, "mode": "batchprompt",
                       "batchprompt": {"instruction": "Say.", "labels": ["a", "b"]},
                       "engine": {"devices": ["cpu", "cpu"]}})
    assert ei.value.problems == ["(top level): mode: batchprompt runs on one device: remove engine.devices and "
                                 "engine.executor"]


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_actors_equal_one_worker_and_survive_a_killed_actor(tmp_path, tiny_model_dir, local_ray, monkeypatch):
    api.submit(_job(tmp_path, tiny_model_dir, "one", "device: cpu", n=40))
    ray_engine = "devices: [cpu, cpu], executor: ray"
    result = api.submit(_job(tmp_path, tiny_model_dir, "ray", ray_engine, n=40))
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "one")
    w = _manifest(tmp_path / "ray")["workers"]
    assert w["executor"] == "ray" and w["reruns"] == 0 and result.rows_ok == 40
    # An actor killed mid-run (its process gets SIGKILL): its shard's missing rows run on the other actor.
    monkeypatch.setenv(FAILPOINT, "0")
    local_ray.shutdown()  # (the actors read the fail point from their environment: a fresh Ray inherits it)
    local_ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    api.submit(_job(tmp_path, tiny_model_dir, "killed", ray_engine, n=40))
    out = tmp_path / "killed"
    assert _rows(out) == _rows(tmp_path / "one")
    assert len(duckdb.sql(f"SELECT id FROM '{out}/*.parquet'").fetchall()) == 40  # each row once
    w = _manifest(out)["workers"]
    assert w["reruns"] == 1 and sum(r["state"] == "lost" for r in w["workers"]) == 1
