"""The output directory is batchrun's: links are never followed, files batchrun did not write are refused,
damage is reported (status) and refused (78) until --fresh rebuilds it, and nothing loads the weights when
there is nothing to do or the job must fail first. Every refusal leaves every byte in the directory as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.errors import BatchrunError
from helpers import SMALL_JOB, write_job

TEXTS = ["Great kettle.", "Broke after a day.", "It is a cable.", "Nice lamp.", "Comfy fit.", "Never again."]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    """One finished job (6 rows, 3 parts); tests copy its output directory and resume or damage the copy."""
    base = tmp_path_factory.mktemp("made")
    data = base / "data.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "text": TEXTS}), data)
    job = write_job(base, SMALL_JOB.format(model=tiny_model_dir, data=data, out=base / "template"))
    api.submit(job)
    return {"job": job, "template": base / "template", "rows": rows(base / "template"), "data": data,
            "model": tiny_model_dir}


def rows(out: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT id, text, output, output_tokens FROM '{out}/*.parquet' ORDER BY id").fetchall()


def copy(made, tmp_path: Path, complete: bool = True, name: str = "out") -> Path:
    """The finished output, or (``complete`` false) as a kill -9 after its first two parts leaves it."""
    out = tmp_path / name
    shutil.copytree(made["template"], out, symlinks=True)
    if not complete:
        for f in ("_SUCCESS", "_manifest.json", "part-000002.parquet"):
            (out / f).unlink()
    return out


def submit(made, out: Path, *sets: str, fresh: bool = False):
    """(exit code, JobResult or error text) of ``batchrun submit`` into ``out``."""
    try:
        return 0, api.submit(made["job"], [f"output.path={out}", *sets], fresh=fresh)
    except BatchrunError as e:
        return e.exit_code, str(e)


def snapshot(directory: Path) -> dict[str, object]:
    """Every entry, never following a link: a file's bytes, a link's target."""
    out = {}
    for name in sorted(os.listdir(directory)):
        p = directory / name
        out[name] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()
    return out


@contextmanager
def weights_never_load():
    from batchrun.engine import loader

    real = loader.load

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    loader.load = refuse
    try:
        yield
    finally:
        loader.load = real


def refused(made, out: Path, *sets: str, fresh: bool = False, code: int = 78) -> str:
    """Submit, expecting exit ``code`` without loading the weights and without changing a byte in ``out``."""
    before = snapshot(out) if out.is_dir() else None
    with weights_never_load():
        got, message = submit(made, out, *sets, fresh=fresh)
    assert got == code, message
    if before is not None:
        assert snapshot(out) == before
    return message


def rewrite_part(src: Path, dst: Path, metadata: dict | None) -> None:
    table = pq.read_table(src)
    pq.write_table(table.replace_schema_metadata(metadata), dst)


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


# ------------------------------------------------------------------------------------------- 1. links


TEMPS = ["._batchrun_job.json.tmp", ".part-000000.parquet.tmp", ".part-000002.parquet.tmp", "._manifest.json.tmp",
         "._SUCCESS.tmp"]


@pytest.mark.parametrize("complete", [None, False])  # None: a new directory; False: resuming a killed run
def test_links_planted_at_temporary_names_are_never_followed(made, tmp_path, complete):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if complete is None:
        out = tmp_path / "out"
        out.mkdir()
    else:
        out = copy(made, tmp_path, complete=False)
    for name in TEMPS:
        (out / name).symlink_to(victim)
    code, result = submit(made, out)
    assert code == 0 and result.status == "ok", result
    assert victim.read_text() == "precious"
    assert not [p for p in out.iterdir() if p.is_symlink()] and not list(out.glob(".*.tmp"))
    assert rows(out) == made["rows"] and api.status(out)["state"] == "complete"


@pytest.mark.parametrize("name", ["part-000001.parquet", "_manifest.json", "_SUCCESS", ".lock"])
def test_a_link_at_a_batchrun_name_is_refused_and_fresh_unlinks_it(made, tmp_path, name):
    out = copy(made, tmp_path)
    victim = tmp_path / "victim"
    shutil.copyfile(out / name, victim)
    original = victim.read_bytes()
    (out / name).unlink()
    (out / name).symlink_to(victim)
    message = refused(made, out)
    assert f"{out / name} is a symbolic link" in message if name == ".lock" else (
        f"output.path: {out} is damaged; --fresh rebuilds it" in message and f"{name}: a symbolic link" in message)
    st = api.status(out)
    assert st["state"] == "damaged" and any(p.startswith(f"{name}: a symbolic link") for p in st["problems"])
    assert "--fresh" in st["fix"]
    code, result = submit(made, out, fresh=True)
    assert code == 0 and result.status == "ok", result
    assert victim.read_bytes() == original  # the link's target: never written, never deleted
    assert not (out / name).is_symlink() and (out / name).is_file()
    assert rows(out) == made["rows"] and api.status(out)["state"] == "complete"


def test_a_linked_job_file_makes_the_directory_not_batchrun_s(made, tmp_path):
    out = copy(made, tmp_path)
    victim = tmp_path / "victim.json"
    shutil.copyfile(out / "_batchrun_job.json", victim)
    (out / "_batchrun_job.json").unlink()
    (out / "_batchrun_job.json").symlink_to(victim)
    for fresh in (False, True):
        message = refused(made, out, fresh=fresh)
        assert message.startswith(f"output.path: {out} holds files batchrun did not write (")
        assert "_batchrun_job.json (a symbolic link)" in message
    assert api.status(out)["state"] == "not_batchrun"
    assert victim.read_bytes() == (made["template"] / "_batchrun_job.json").read_bytes()


# ------------------------------------------------------------------------------------------- 2. foreign files


def test_a_foreign_parquet_file_named_like_a_part_is_never_adopted(made, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": [0, 1], "text": ["x", "y"]}), out / "part-000000.parquet")
    for fresh in (False, True):
        message = refused(made, out, fresh=fresh)
        assert message == (f"output.path: {out} holds files batchrun did not write (part-000000.parquet); "
                           "choose an empty or new directory")
    assert os.listdir(out) == ["part-000000.parquet"]  # not even a lock file
    assert api.status(out)["state"] == "not_batchrun"


@pytest.mark.parametrize("complete", [True, False])
def test_stray_files_in_batchrun_s_directory_are_refused_by_name(made, tmp_path, complete):
    out = copy(made, tmp_path, complete)
    (out / "notes.txt").write_text("mine")
    pq.write_table(pa.table({"x": [1]}), out / "extra.parquet")
    for fresh in (False, True):  # --fresh never deletes files batchrun did not write
        message = refused(made, out, fresh=fresh)
        assert message == (f"output.path: {out} holds files batchrun did not write (extra.parquet, notes.txt); "
                           "batchrun never deletes them, not even with --fresh: remove them, or choose another "
                           "output.path")
    st = api.status(out)
    assert st["state"] == "damaged" and st["problems"] == ["extra.parquet: not written by batchrun",
                                                           "notes.txt: not written by batchrun"]
    assert st["fix"].startswith("remove the files batchrun did not write")
    (out / "notes.txt").unlink()
    (out / "extra.parquet").unlink()
    code, result = submit(made, out)
    assert code == 0 and result.status == ("already_complete" if complete else "ok")
    assert rows(out) == made["rows"]  # the README's glob read works


def test_a_part_without_batchrun_metadata_is_a_foreign_file(made, tmp_path):
    out = copy(made, tmp_path, complete=False)
    rewrite_part(out / "part-000000.parquet", out / "part-000007.parquet", None)
    message = refused(made, out)
    assert "part-000007.parquet (a Parquet file without batchrun's metadata)" in message
    refused(made, out, fresh=True)


def test_a_part_of_another_job_is_refused_and_fresh_rebuilds(made, tmp_path):
    out = copy(made, tmp_path, complete=False)
    meta = pq.read_metadata(out / "part-000000.parquet").metadata
    other = json.loads(meta[b"batchrun"]) | {"results_hash": "0123456789abcdef"}
    rewrite_part(out / "part-000000.parquet", out / "part-000005.parquet",
                 {b"batchrun": json.dumps(other).encode()})
    message = refused(made, out)
    assert "part-000005.parquet: a part of another job (results hash 0123456789abcdef;" in message
    assert api.status(out)["state"] == "damaged"
    code, result = submit(made, out, fresh=True)
    assert code == 0 and not (out / "part-000005.parquet").exists() and rows(out) == made["rows"]


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
