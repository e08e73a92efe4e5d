"""The output directory's state: its format (the manifest and parts), damage reported (status) and refused (78)
until --fresh rebuilds it, results of another job, paths that cannot be written (a file, a read-only disk), and
nothing loads the weights when there is nothing to do or the job must fail first. Every refusal leaves every byte
in the directory as it was. Links and files batchrun did not write: test_output_dir_foreign.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from helpers import copy, refused, rows, snapshot, submit, weights_never_load

# ------------------------------------------------------------------------------------------- format


def test_manifest_lists_the_parts_and_each_part_carries_the_results_hash(made):
    out = made["template"]
    manifest = json.loads((out / "_manifest.json").read_text())
    job = json.loads((out / "_batchrun_job.json").read_text())
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert manifest["parts"] == [{"name": p, "rows": 2, "bytes": (out / p).stat().st_size} for p in parts]
    assert manifest["results_hash"] == job["results_hash"]
    for p in parts:
        meta = json.loads(pq.read_metadata(out / p).metadata[b"batchrun"])
        assert meta["results_hash"] == job["results_hash"] and meta["job"] == "small"
    assert api.status(out)["state"] == "complete"


# ------------------------------------------------------------------------------------------- 3. damage


def _damage(out: Path, kind: str) -> str:
    if kind == "truncated part":
        data = (out / "part-000001.parquet").read_bytes()
        (out / "part-000001.parquet").write_bytes(data[: len(data) // 2])
        return "part-000001.parquet: damaged, not a readable Parquet file"
    if kind == "corrupt manifest":
        (out / "_manifest.json").write_text('{"job": "small", "compl')
        return "_manifest.json: damaged, not readable JSON"
    if kind == "corrupt job file":
        (out / "_batchrun_job.json").write_bytes(b"\x00\x00\x00")
        return "_batchrun_job.json: damaged, not readable JSON"
    (out / "_batchrun_job.json").write_text('["not", "a", "job"]')
    return "_batchrun_job.json: damaged, not batchrun's record"


@pytest.mark.parametrize("complete", [True, False])
@pytest.mark.parametrize("kind", ["truncated part", "corrupt manifest", "corrupt job file", "foreign json"])
def test_damage_is_reported_refused_with_78_and_fresh_rebuilds(made, tmp_path, kind, complete):
    out = copy(made, tmp_path, complete)
    if kind == "corrupt manifest" and not complete:
        (out / "_manifest.json").write_text("{}")
    problem = _damage(out, kind)
    (out / ".lock").unlink()  # a refusal creates nothing, not even the lock file
    st = api.status(out)
    assert st["state"] == "damaged" and any(p.startswith(problem) for p in st["problems"]), st
    assert st["fix"] == "batchrun submit --fresh rebuilds it (its results are deleted and computed again)"
    message = refused(made, out)
    assert message.startswith(f"output.path: {out} is damaged; --fresh rebuilds it") and problem in message
    refused(made, out)  # the same verdict again: never "retry later"
    code, result = submit(made, out, fresh=True)
    assert code == 0 and result.status == "ok", result
    assert rows(out) == made["rows"] and api.status(out)["state"] == "complete"


def test_duplicate_ids_across_parts_are_damage(made, tmp_path):
    out = copy(made, tmp_path, complete=False)
    shutil.copyfile(out / "part-000000.parquet", out / "part-000004.parquet")  # the same rows twice
    message = refused(made, out)
    assert "the parts hold 2 duplicate id(s)" in message


def test_status_text_names_the_damage_and_the_fix(made, tmp_path):
    from click.testing import CliRunner

    from batchrun.cli import cli

    out = copy(made, tmp_path)
    (out / "_manifest.json").write_text("{ not json")
    r = CliRunner().invoke(cli, ["status", str(out)])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{out}: damaged")
    assert any(line.startswith("  problem: _manifest.json") for line in lines), r.stdout
    assert any(line.startswith("  fix: ") and "--fresh" in line for line in lines), r.stdout


@pytest.mark.parametrize("change", ["extra part", "missing part", "other rows"])
def test_a_finished_directory_must_hold_exactly_the_parts_of_its_manifest(made, tmp_path, change):
    out = copy(made, tmp_path)
    if change == "extra part":
        shutil.copyfile(out / "part-000001.parquet", out / "part-000003.parquet")
        problem = "part-000003.parquet: not listed in _manifest.json of the finished job"
    elif change == "missing part":
        (out / "part-000001.parquet").unlink()
        problem = "part-000001.parquet: listed in _manifest.json but missing (its rows are lost)"
    else:
        table = pq.read_table(out / "part-000001.parquet").slice(0, 1)
        pq.write_table(table, out / "part-000001.parquet")
        problem = "part-000001.parquet: 1 rows,"
    message = refused(made, out)
    assert problem in message and "--fresh rebuilds it" in message
    assert any(p.startswith(problem) for p in api.status(out)["problems"])


# ------------------------------------------------------------------------------------------- 4. fingerprint


@pytest.mark.parametrize("complete", [True, False])
def test_other_output_columns_are_another_job(made, tmp_path, complete):
    out = copy(made, tmp_path, complete)
    message = refused(made, out, "output.columns=[]")
    assert "holds results of a different job" in message and "rerun with --fresh to rebuild it" in message
    code, result = submit(made, out, "output.columns=[]", fresh=True)
    assert code == 0 and result.status == "ok"
    schemas = {tuple(pq.read_schema(p).names) for p in out.glob("part-*.parquet")}
    assert schemas == {("id", "output", "prompt_tokens", "output_tokens", "finish_reason", "error")}


# ------------------------------------------------------------------------------------------- 5. permanent


def test_an_output_path_that_is_a_file_or_under_one_is_78(made, tmp_path):
    (tmp_path / "afile").write_text("x")
    message = refused(made, tmp_path / "afile")
    assert message == f"output.path: {tmp_path / 'afile'} is a file, not a directory; choose another output.path"
    message = refused(made, tmp_path / "afile" / "sub")
    assert message == (f"output.path: {tmp_path / 'afile' / 'sub'} cannot be a directory: {tmp_path / 'afile'} "
                       "is a file; choose another output.path")
    assert (tmp_path / "afile").read_text() == "x"
    assert api.status(tmp_path / "afile")["state"] == "not_a_directory"


@contextmanager
def read_only(monkeypatch, root: Path):
    """A read-only filesystem under ``root``: every attempt to create, write, rename or delete fails EROFS."""
    def guard(path) -> None:
        if str(path).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    real_open = os.open

    def ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            guard(path)
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", ro_open)
        for name in ("mkdir", "unlink", "replace", "rename", "rmdir"):
            real = getattr(os, name)
            m.setattr(os, name, lambda path, *a, _real=real, **k: (guard(path), _real(path, *a, **k))[1])
        yield


@pytest.mark.parametrize("lock_file", [True, False])
def test_a_finished_job_on_a_read_only_disk_is_exit_0_and_writes_nothing(made, tmp_path, monkeypatch, lock_file):
    out = copy(made, tmp_path)
    if not lock_file:
        (out / ".lock").unlink()
    before = snapshot(out)
    with read_only(monkeypatch, out), weights_never_load():
        code, result = submit(made, out)
        assert code == 0 and result.status == "already_complete" and result.rows_total == 6
        assert api.status(out)["state"] == "complete"
        message = refused(made, out, fresh=True)  # a rebuild needs to write: not retryable
        assert message.startswith(f"output.path: {out} is not writable (Read-only file system)")
    assert snapshot(out) == before


def test_an_unfinished_job_on_a_read_only_disk_is_78(made, tmp_path, monkeypatch):
    out = copy(made, tmp_path, complete=False)
    with read_only(monkeypatch, out):
        message = refused(made, out)
    assert message == (f"output.path: {out} is not writable (Read-only file system); make it writable or choose "
                       "another output.path")


# ------------------------------------------------------------------------------------------- 6. no weights


@pytest.mark.parametrize("earlier_manifest", [False, True])
def test_a_job_whose_rows_are_all_committed_is_finished_without_loading_weights(made, tmp_path, earlier_manifest):
    out = copy(made, tmp_path)
    (out / "_SUCCESS").unlink()
    if earlier_manifest:  # stopped after its last part
        manifest = json.loads((out / "_manifest.json").read_text())
        (out / "_manifest.json").write_text(json.dumps({**manifest, "complete": False, "stopped_by": "SIGTERM"}))
    else:  # killed after its last part
        (out / "_manifest.json").unlink()
    assert api.status(out)["state"] == "incomplete"
    with weights_never_load():
        code, result = submit(made, out)
    assert code == 0, result
    assert (result.status, result.rows_skipped, result.rows_ok, result.rows_error) == ("ok", 6, 0, 0)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] is True and "stopped_by" not in manifest
    assert manifest["rows"] == {"total": 6, "ok": 6, "error": 0, "this_run": 0, "from_earlier_runs": 6}
    assert manifest["model"]["device"] == ("cpu" if earlier_manifest else None)
    assert [p["name"] for p in manifest["parts"]] == [f"part-00000{i}.parquet" for i in range(3)]
    assert rows(out) == made["rows"] and api.status(out)["state"] == "complete"


def test_failures_that_can_be_known_come_before_the_weights(made, tmp_path):
    out = tmp_path / "out"
    message = refused(made, out, "output.columns=[nope]", code=65)
    assert message.startswith("output.columns:")
    refused(made, out, "sampling.max_tokens=nope", code=65)
    refused(made, out, "prompt.template='{{ text '", code=78)
    assert api.status(out)["state"] in ("missing", "empty")
    empty = tmp_path / "empty.parquet"  # an empty input: nothing to generate, nothing to load
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}), empty)
    with weights_never_load():
        code, result = submit(made, out, f"input.path={empty}")
    assert code == 0 and (result.status, result.rows_total) == ("ok", 0)
    assert api.status(out)["state"] == "complete"
