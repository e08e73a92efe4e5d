"""Input from an object store (``s3://bucket/key``, globs), against moto's S3 server on the loopback interface:
the same rows as the same input read locally (``input.sql`` over it, a column missing in one object), a changed
object is another job, missing objects are input errors."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.errors import InputDataError, SpecError
from batchrun.io.outdir import MANIFEST, read_state
from batchrun.io.store import ObjectStore
from helpers import SMALL_JOB, write_job


def _upload(url: str, name: str, table: pa.Table, fmt: str = "parquet") -> str:
    import pyarrow.csv as pcsv

    store = ObjectStore(url)
    target = f"{store.root}/{name}"
    with store.fs.open_output_stream(target) as f:
        if fmt == "parquet":
            pq.write_table(table, f)
        else:
            pcsv.write_csv(table, f)
    return f"{url}/{name}"


def test_input_from_the_object_store_equals_the_same_input_read_locally(tmp_path, url, tiny_model_dir):
    """Two Parquet objects under a glob (one lacks a column: nulls there), input.sql over them, output on S3."""
    a = pa.table({"id": [0, 1, 2], "text": ["Great kettle.", "Broke.", "A cable."], "stars": [5, 1, 3]})
    b = pa.table({"id": [3, 4], "text": ["Nice.", "Never again."]})
    for name, t in (("a.parquet", a), ("b.parquet", b)):
        pq.write_table(t, tmp_path / name)
        _upload(url, f"in/2026-{name}", t)
    _upload(url, "in/other.csv", a, fmt="csv")  # (not matched by the glob)
    local = write_job(tmp_path, SMALL_JOB.format(model=tiny_model_dir, data=tmp_path / "*.parquet",
                                               out=tmp_path / "local"), "local.yaml")
    sql = "input.sql=SELECT * FROM input WHERE id <> 2"
    api.submit(local, [sql])
    result = api.submit(local, [sql, f"input.path={url}/in/2026-*.parquet", f"output.path={url}/out"])
    assert result.status == "ok" and result.rows_total == 4
    cols = ["id", "text", "stars", "output", "output_tokens"]
    want = duckdb.sql(f"SELECT {', '.join(cols)} FROM '{tmp_path}/local/*.parquet' ORDER BY id").fetchall()
    store = ObjectStore(f"{url}/out")
    got = pa.concat_tables([store.read_table(n, cols) for n in read_state(f"{url}/out").parts]).sort_by("id")
    assert list(zip(*(got.column(c).to_pylist() for c in cols))) == want
    assert [r[2] for r in want] == [5, 1, None, None]
    m = json.loads(store.read(MANIFEST))
    assert [f["path"] for f in m["input"]["files"]] == [f"{url}/in/2026-a.parquet", f"{url}/in/2026-b.parquet"]
    assert all(f["size"] > 0 and f["mtime_ns"] > 0 for f in m["input"]["files"])
    # A changed input object is another job: its output is refused unless --fresh.
    _upload(url, "in/2026-b.parquet", pa.table({"id": [3, 4], "text": ["Changed.", "Never again."]}))
    with pytest.raises(SpecError, match="holds results of a different job"):
        api.submit(local, [sql, f"input.path={url}/in/2026-*.parquet", f"output.path={url}/out"])


def test_missing_input_objects_are_input_errors(tmp_path, url, tiny_model_dir):
    job = write_job(tmp_path, SMALL_JOB.format(model=tiny_model_dir, data=f"{url}/nothing.parquet",
                                             out=tmp_path / "out"))
    with pytest.raises(InputDataError, match=f"input.path: no object '{url}/nothing.parquet'"):
        api.submit(job)
    with pytest.raises(InputDataError, match=r"input.path: no object matches .*/none-\*\.parquet"):
        api.submit(job, [f"input.path={url}/none-*.parquet"])
    assert not list((tmp_path / "out").glob("*.parquet"))  # (nothing written but the lock)
