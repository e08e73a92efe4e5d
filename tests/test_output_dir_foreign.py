"""The output directory is batchrun's: links are never followed, and files batchrun did not write (stray files,
foreign Parquet files, parts of another job) are refused, --fresh never deleting them. Every refusal leaves every
byte in the directory as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from helpers import copy, refused, rows, submit


def rewrite_part(src: Path, dst: Path, metadata: dict | None) -> None:
    table = pq.read_table(src)
    pq.write_table(table.replace_schema_metadata(metadata), dst)


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
