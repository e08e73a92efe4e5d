"""Running unattended: kill -9 and resume, SIGTERM, error-rate threshold, storage faults, odd input."""

from __future__ import annotations

import json
import os
import random
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
from batchrun.errors import RuntimeFailure, SpecError, TemporaryFailure
from helpers import REPO, make_tiny_model, write_job

JOB = """
name: rel
model: {{path: "{model}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Item {{{{ id }}}}: {{{{ text }}}}", chat: false}}
sampling: {{max_tokens: {max_tokens}, ignore_eos: true}}
output: {{path: "{out}", part_rows: {part_rows}}}
engine: {{device: cpu, step_tokens: 64, kv_budget_tokens: 2048, threads: 1}}
"""


def _data(tmp_path: Path, n: int) -> Path:
    words = ["kettle", "charger", "lamp", "mat", "grinder", "earbuds", "ça marche", "😀 fine", "שלום", "a\\x00b"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), path)
    return path


def _job(tmp_path: Path, model: str, n: int, out: str = "out", max_tokens: int = 12, part_rows: int = 4) -> Path:
    return write_job(tmp_path, JOB.format(model=model, data=_data(tmp_path, n), out=tmp_path / out,
                                          max_tokens=max_tokens, part_rows=part_rows), f"{out}.yaml")


def _rows(out: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT id, output, output_tokens, finish_reason FROM '{out}/*.parquet' ORDER BY id").fetchall()


def _submit(job: Path, *args: str, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "batchrun", "--log-format", "json", "submit", str(job), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(out: Path, timeout: float = 60) -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if out.is_dir() and any(out.glob("part-*.parquet")):
            return
        time.sleep(0.05)
    raise AssertionError("no part was written in time")


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    clean_job = _job(tmp_path, tiny_model_dir, 600, out="clean", max_tokens=16)
    assert api.submit(clean_job).rows_total == 600
    clean = _rows(tmp_path / "clean")
    job = _job(tmp_path, tiny_model_dir, 600, out="killed", max_tokens=16)
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        p = _submit(job)
        _wait_for_parts(out)
        time.sleep(rng.uniform(0.0, 0.5))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
        committed = len(duckdb.sql(f"SELECT id FROM '{out}/*.parquet'").fetchall())
        assert committed == len({r[0] for r in _rows(out)})  # never a duplicate, even mid-way
        if (out / "_SUCCESS").exists():  # finished just before the kill: then it is whole
            assert committed == 600
    assert kills >= 1
    p = _submit(job, "--json")
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0, stdout
    assert _rows(out) == clean


def test_sigterm_stops_gracefully_with_75_and_resumes(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir, 400, max_tokens=24, part_rows=1000)
    out = tmp_path / "out"
    p = _submit(job, "--json", BATCHRUN_PROGRESS_INTERVAL="0.2")
    t = time.monotonic()
    while time.monotonic() - t < 120:  # until some rows are done (a progress line says so), however slow
        line = p.stderr.readline()
        if '"event": "progress"' in line and json.loads(line)["rows_done"] > 0:
            break
    p.send_signal(signal.SIGTERM)
    t = time.monotonic()
    stdout, stderr = p.communicate(timeout=30)
    assert time.monotonic() - t < 10, "the graceful stop must be quick"
    assert p.returncode == 75, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["exit_code"] == 75 and "stopped by SIGTERM" in summary["error"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False and manifest["stopped_by"] == "SIGTERM"
    assert not (out / "_SUCCESS").exists()
    saved = len(_rows(out))
    assert 0 < saved < 400 and manifest["rows"]["total"] == saved
    assert api.status(out)["state"] == "incomplete"
    result = api.submit(job)
    assert (result.status, result.rows_skipped, len(_rows(out))) == ("ok", saved, 400)


def test_error_rate_threshold_fails_the_job_but_keeps_its_rows(tmp_path, tiny_model_dir):
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": ["a", None, "c", None]}), data)
    job = write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=tmp_path / "out", max_tokens=2,
                                         part_rows=10).replace('"Item {{ id }}: {{ text }}"', '"{{ text }}"')
                    + "\n", "j.yaml")
    with pytest.raises(RuntimeFailure) as e:
        api.submit(job, ["output.max_error_rate=0.25"])
    assert e.value.exit_code == 1 and e.value.message.startswith("2 of 4 rows failed (50.0%), more than")
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists() and len(_rows(out)) == 4
    with pytest.raises(RuntimeFailure):  # the same verdict on a rerun, without duplicating rows
        api.submit(job, ["output.max_error_rate=0.25"])
    assert len(_rows(out)) == 4
    assert api.submit(job, ["output.max_error_rate=0.5"]).status == "ok" and (out / "_SUCCESS").exists()


def test_disk_full_leaves_no_committed_looking_file_and_resume_works(tmp_path, tiny_model_dir, monkeypatch):
    clean_job = _job(tmp_path, tiny_model_dir, 12, out="clean", part_rows=2)
    api.submit(clean_job)
    job = _job(tmp_path, tiny_model_dir, 12, out="full", part_rows=2)
    real = pq.write_table
    calls = {"n": 0}

    def full_after_two(table, where, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            where.write(b"PAR1 half a file")  # the disk fills mid-write (parts are written through a file)
            raise OSError(28, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_after_two)
    with pytest.raises(TemporaryFailure) as e:
        api.submit(job)
    assert e.value.exit_code == 75 and "No space left on device" in e.value.message
    out = tmp_path / "full"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == [
        ".lock", "part-000000.parquet", "part-000001.parquet"]
    monkeypatch.setattr(pq, "write_table", real)
    assert api.submit(job).rows_skipped == 4
    assert _rows(out) == _rows(tmp_path / "clean")


def test_empty_input_gives_a_valid_empty_output(tmp_path, tiny_model_dir):
    data = tmp_path / "e.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), data)
    job = write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=tmp_path / "out", max_tokens=2,
                                         part_rows=10), "e.yaml")
    result = api.submit(job)
    assert (result.status, result.rows_total) == ("ok", 0)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall() == [(0,)]
    assert pq.read_schema(next(out.glob("part-*.parquet"))).names[:2] == ["id", "text"]


def test_unicode_emoji_rtl_and_nul_bytes_survive_the_round_trip(tmp_path, tiny_model_dir):
    texts = ["naïve café", "😀🎉 emoji", "שלום עולם", "nul\x00byte", "混合 text"]
    data = tmp_path / "u.parquet"
    pq.write_table(pa.table({"id": list(range(5)), "text": texts}), data)
    job = write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=tmp_path / "out", max_tokens=3,
                                         part_rows=10), "u.yaml")
    assert api.submit(job).rows_ok == 5
    got = duckdb.sql(f"SELECT text FROM '{tmp_path}/out/*.parquet' ORDER BY id").fetchall()
    assert [r[0] for r in got] == texts


def test_yaml_cannot_build_python_objects(tmp_path):
    from batchrun.errors import SpecError
    from batchrun.spec import load_spec

    job = write_job(tmp_path, "model: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(job)
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_mixed_column_types_across_files_are_unified_or_named(tmp_path):
    from batchrun.io.source import read_source
    from batchrun.spec import InputSpec

    pq.write_table(pa.table({"id": [1, 2], "n": pa.array([1, 2], pa.int32())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [3], "n": pa.array([3.5], pa.float64())}), tmp_path / "b.parquet")
    src = read_source(InputSpec(path=str(tmp_path / "*.parquet"), id="id"))
    assert src.table.column("n").to_pylist() == [1.0, 2.0, 3.5]  # promoted to a common type
    pq.write_table(pa.table({"id": [4], "n": ["text"]}), tmp_path / "c.parquet")
    try:
        src = read_source(InputSpec(path=str(tmp_path / "*.parquet"), id="id"))
        assert src.table.column("n").to_pylist()[-1] == "text"
    except Exception as e:  # if DuckDB cannot unify, the error must be ours and name the input
        from batchrun.errors import InputDataError

        assert isinstance(e, InputDataError) and e.message.startswith("input.")


def test_output_path_that_cannot_be_a_directory_is_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / "afile").write_text("x")
    job = _job(tmp_path, tiny_model_dir, 3)
    with pytest.raises(SpecError) as e:  # permanent: never "retry later"
        api.submit(job, [f"output.path={tmp_path / 'afile' / 'sub'}"])
    assert e.value.exit_code == 78 and e.value.message == (
        f"output.path: {tmp_path / 'afile' / 'sub'} cannot be a directory: {tmp_path / 'afile'} is a file; "
        "choose another output.path")
    assert (tmp_path / "afile").read_text() == "x"


DRIVER = """
import pathlib, sys, time
from batchrun.engine import loader
marker, stage = pathlib.Path(sys.argv[1]), sys.argv[2]
real = getattr(loader, stage)
def slow(*args, **kwargs):
    marker.write_text(stage)
    time.sleep(120)
    return real(*args, **kwargs)
setattr(loader, stage, slow)
from batchrun.cli import main
sys.argv = ["batchrun", "--log-format", "json", "submit", *sys.argv[3:]]
main()
"""


def _sigterm_during(tmp_path: Path, stage: str, job: Path) -> tuple[int, dict]:
    """Run ``submit --json`` with ``loader.<stage>`` slowed down, send SIGTERM while it is in there; returns
    the exit code and the JSON summary."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / f"{stage}.started"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(driver), str(marker), stage, str(job), "--json"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.monotonic()
    while not marker.exists():
        assert p.poll() is None and time.monotonic() - t < 120, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    t = time.monotonic()
    stdout, stderr = p.communicate(timeout=60)
    assert time.monotonic() - t < 10, "the graceful stop must be quick"
    assert p.returncode == 75, stderr
    return p.returncode, json.loads(stdout.strip().splitlines()[-1])


def test_sigterm_before_and_while_the_model_loads_stops_gracefully_with_75(tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir, 12, part_rows=4)
    out = tmp_path / "out"
    assert api.submit(job).rows_ok == 12
    clean = _rows(out)
    for name in ("_SUCCESS", "_manifest.json", "part-000002.parquet"):  # as a kill -9 after two parts leaves it
        (out / name).unlink()
    kept = {p.name: p.read_bytes() for p in out.iterdir()}

    # While the tokenizer loads nothing has been written: the directory stays exactly as it was.
    code, summary = _sigterm_during(tmp_path, "load_tokenizer", job)
    assert summary["exit_code"] == 75 and summary["error"] == (
        f"stopped by SIGTERM before any row was computed; {out} is as it was (rows committed earlier are kept); "
        "rerun the same command")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept

    # While the weights load: an incomplete manifest; the committed parts are kept as they were.
    code, summary = _sigterm_during(tmp_path, "load", job)
    assert summary["exit_code"] == 75 and summary["error"] == (
        f"stopped by SIGTERM: 8 of 12 rows are saved in {out}; rerun the same command to finish the job")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is False and manifest["stopped_by"] == "SIGTERM"
    assert manifest["rows"]["total"] == 8 and [p["name"] for p in manifest["parts"]] == [
        "part-000000.parquet", "part-000001.parquet"]
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == {k: v for k, v in kept.items() if k[:4] == "part"}
    assert not (out / "_SUCCESS").exists() and api.status(out)["state"] == "incomplete"
    result = api.submit(job)
    assert (result.status, result.rows_skipped, result.rows_ok) == ("ok", 8, 4) and _rows(out) == clean


LAYER_DRIVER = """
import sys, time
from batchrun.engine import runner
real = runner.Runner.between_layers
log = sys.argv[1]
def slow(self, index):
    with open(log, "a") as f:  # one line per decoder layer started
        f.write(f"{index}\\n")
    time.sleep(0.3)
    return real(self, index)
runner.Runner.between_layers = slow
from batchrun.cli import main
sys.argv = ["batchrun", "--log-format", "json", "submit", *sys.argv[2:]]
main()
"""


def test_sigterm_inside_a_long_step_stops_at_the_next_layer(tmp_path, tiny_model_dir):
    """A step can take minutes on a CPU (a long prefill): a stop request is seen between decoder layers, so
    at most the layer already running finishes; rows done before are kept and the job resumes."""
    job = _job(tmp_path, tiny_model_dir, 6, max_tokens=3, part_rows=1)
    driver, layers = tmp_path / "layers.py", tmp_path / "layers.log"
    driver.write_text(LAYER_DRIVER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(driver), str(layers), str(job), "--json", "--set",
                          "engine.step_tokens=16"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t = time.monotonic()
    while not layers.exists() or len(layers.read_text().splitlines()) < 9:  # a few steps (2 layers each) in
        assert p.poll() is None and time.monotonic() - t < 120, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    seen = len(layers.read_text().splitlines())
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 75, stderr
    assert len(layers.read_text().splitlines()) <= seen + 1  # no layer started after the one in flight
    assert "stopped in the middle of a step" in stderr
    assert json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 75
    result = api.submit(job)
    assert result.status == "ok" and result.rows_ok + result.rows_skipped == 6


def test_pickled_weights_are_refused(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from batchrun.engine.loader import load
    from batchrun.spec import EngineSpec, ModelSpec

    src = make_tiny_model(tmp_path / "src", "llama", tokenizer_dir)
    (tmp_path / "pickled").mkdir()
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "pickled" / f).write_bytes((tmp_path / "src" / f).read_bytes())
    assert (tmp_path / "pickled" / "pytorch_model.bin").exists()
    with pytest.raises(RuntimeFailure, match="cannot load"):
        load(ModelSpec(path=str(tmp_path / "pickled")), EngineSpec(device="cpu"))
