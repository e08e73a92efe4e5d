"""A whole job through the Python API: output rows, per-row errors, manifest, metadata, re-runs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.engine.batch import BatchEngine
from batchrun.engine.reference import ReferenceEngine
from batchrun.errors import SpecError
from batchrun.spec import load_spec
from helpers import REPO, crash_after_first_batch, write_job

JOB = """
name: t
model: {{path: {model}}}
input: {{path: {data}, id: id}}
prompt: {{template: "Review: {{{{ text }}}}\\nSummary:", chat: false}}
sampling: {{max_tokens: {max_tokens}, ignore_eos: true}}
output: {{path: {out}, part_rows: 2}}
engine: {{device: cpu, batch_size: 2}}
"""


def _job(tmp_path: Path, model: str, data: Path, max_tokens: object = 3) -> Path:
    return write_job(tmp_path, JOB.format(model=model, data=data, out=tmp_path / "out", max_tokens=max_tokens))


def _rows(out: Path) -> list[dict]:
    return duckdb.sql(f"SELECT * FROM '{out}/*.parquet' ORDER BY id").fetchall()


def test_job_rows_errors_manifest_and_metadata(tmp_path, tiny_model_dir, reviews_parquet):
    spec = load_spec(_job(tmp_path, tiny_model_dir, reviews_parquet, max_tokens="budget"))
    result = api.submit(spec)
    assert (result.status, result.rows_total, result.rows_ok, result.rows_error) == ("ok", 6, 5, 1)
    out = tmp_path / "out"
    rows = duckdb.sql(f"SELECT id, lang, budget, output_tokens, finish_reason, error, output IS NULL "
                      f"FROM '{out}/*.parquet' ORDER BY id").fetchall()
    assert rows == [
        ("a", "en", 3, 3, "length", None, False), ("b", "en", 2, 2, "length", None, False),
        ("c", "en", 4, 4, "length", None, False), ("d", "en", 3, 0, "error", "column 'text' is null", True),
        ("e", "de", 1, 1, "length", None, False), ("f", "en", 5, 5, "length", None, False),
    ]
    cols = pq.read_schema(next(out.glob("part-*.parquet")))
    assert cols.names == ["id", "text", "lang", "budget", "output", "prompt_tokens", "output_tokens",
                          "finish_reason", "error"]
    meta = json.loads(cols.metadata[b"batchrun"])
    assert meta["job"] == "t" and meta["spec_hash"] == spec.spec_hash() and meta["model"] == tiny_model_dir
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == {"total": 6, "ok": 5, "error": 1, "this_run": 6, "from_earlier_runs": 0}
    assert manifest["tokens"]["output"] == 15 == result.output_tokens
    assert manifest["spec_hash"] == spec.spec_hash() and manifest["versions"]["torch"]
    assert (out / "_SUCCESS").exists() and not list(out.glob(".*.tmp"))
    assert api.status(out)["state"] == "complete"


def test_rerun_is_a_noop_and_fresh_rebuilds(tmp_path, tiny_model_dir, reviews_parquet):
    path = _job(tmp_path, tiny_model_dir, reviews_parquet)
    api.submit(path)
    rows = _rows(tmp_path / "out")
    again = api.submit(path)
    assert again.status == "already_complete" and again.rows_total == 6
    assert _rows(tmp_path / "out") == rows
    fresh = api.submit(path, fresh=True)
    assert fresh.status == "ok" and _rows(tmp_path / "out") == rows  # greedy: identical rows


def test_changed_spec_is_refused_unless_fresh(tmp_path, tiny_model_dir, reviews_parquet):
    path = _job(tmp_path, tiny_model_dir, reviews_parquet)
    api.submit(path)
    with pytest.raises(SpecError) as e:
        api.submit(path, ["sampling.max_tokens=2"])
    assert e.value.exit_code == 78 and "holds results of a different job" in e.value.message
    assert api.submit(path, ["sampling.max_tokens=2"], fresh=True).output_tokens == 10
    # engine settings do not change the results: no refusal
    assert api.submit(path, ["sampling.max_tokens=2", "engine.batch_size=5"]).status == "already_complete"


@pytest.mark.parametrize("backend", ["batchrun", "reference"])
@pytest.mark.parametrize("part_rows", [2, 1000])  # 1000: the finished rows are flushed as the job fails
def test_crash_then_rerun_keeps_committed_rows_and_duplicates_none(tmp_path, tiny_model_dir, reviews_parquet,
                                                                   monkeypatch, part_rows, backend):
    path = _job(tmp_path, tiny_model_dir, reviews_parquet)
    path.write_text(path.read_text().replace("part_rows: 2", f"part_rows: {part_rows}")
                    .replace("batch_size: 2", f"batch_size: 2, backend: {backend}, step_tokens: 16"))
    api.submit(path, ["output.path=" + str(tmp_path / "clean")])
    clean = _rows(tmp_path / "clean")

    engine_cls = BatchEngine if backend == "batchrun" else ReferenceEngine
    real_run = engine_cls.run
    first = crash_after_first_batch(monkeypatch, engine_cls)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.submit(path)
    out = tmp_path / "out"
    st = api.status(out)
    committed = 1 + len(first)  # the error row, and the first rows to finish
    assert st["state"] == "incomplete" and st["rows_committed"] == committed < 6
    monkeypatch.setattr(engine_cls, "run", real_run)
    result = api.submit(path)
    assert (result.rows_skipped, result.rows_ok + result.rows_error) == (committed, 6 - committed)
    assert _rows(out) == clean
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["total"] == 6 and manifest["rows"]["from_earlier_runs"] == committed


def test_prompt_longer_than_context_is_a_row_error(tmp_path, tiny_model_dir):
    data = tmp_path / "long.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["short one", "word " * 600]}), data)
    result = api.submit(_job(tmp_path, tiny_model_dir, data))
    assert (result.rows_ok, result.rows_error) == (1, 1)
    ((err,),) = duckdb.sql(f"SELECT error FROM '{tmp_path}/out/*.parquet' WHERE id = 2").fetchall()
    assert err.startswith("prompt has ") and err.endswith("tokens; the model's context is 512")


def test_foreign_directory_is_never_written(tmp_path, tiny_model_dir, reviews_parquet):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.csv").write_text("keep me")
    with pytest.raises(SpecError, match="holds files batchrun did not write"):
        api.submit(_job(tmp_path, tiny_model_dir, reviews_parquet))
    assert sorted(p.name for p in out.iterdir()) == ["precious.csv"]  # not even a lock file
    assert (out / "precious.csv").read_text() == "keep me"


@pytest.mark.slow
def test_example_job_end_to_end(tmp_path, monkeypatch):
    """The shipped example job on the real SmolLM2: every row answered with a real sentence."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "example"
    result = api.submit(REPO / "jobs/example.yaml", [f"output.path={out}"])
    assert (result.status, result.rows_total, result.rows_ok, result.rows_error) == ("ok", 240, 240, 0)
    import polars as pl

    df = pl.read_parquet(str(out / "*.parquet"))
    assert df.height == 240 and df["review_id"].n_unique() == 240
    assert set(df["finish_reason"].to_list()) <= {"stop", "length"}
    assert df.filter(pl.col("output").str.len_chars() < 10).height == 0
    # The model read the review: most summaries name the product or a word from the review.
    hits = sum(p.split()[-1].lower() in o.lower() for p, o in zip(df["product"], df["output"]))
    assert hits >= 60, f"only {hits} summaries mention their product"


@pytest.mark.slow
def test_extraction_example_gives_json_valid_against_its_schema(tmp_path, monkeypatch):
    """examples/extract.yaml on the real SmolLM2 (24 of its rows): every output is one JSON object with the
    schema's keys, a sentiment from its enum, and ``output_json`` holds it parsed."""
    import json

    import polars as pl

    monkeypatch.chdir(REPO)
    out = tmp_path / "extract"
    result = api.submit(REPO / "examples/extract.yaml",
                        [f"output.path={out}", "input.sql=SELECT * FROM input WHERE lang = 'en' LIMIT 24"])
    assert (result.status, result.rows_ok, result.rows_error) == ("ok", 24, 0)
    assert result.constraint["kind"] == "json_schema" and result.constraint["masks"] > 0
    df = pl.read_parquet(str(out / "*.parquet"))
    assert df.schema["output_json"] == pl.Struct({"product": pl.String, "sentiment": pl.String,
                                                  "complaints": pl.List(pl.String)})
    for output, value in zip(df["output"], df["output_json"]):
        assert value == json.loads(output)
        assert set(value) == {"product", "sentiment", "complaints"} and value["sentiment"] in (
            "positive", "negative", "mixed") and isinstance(value["complaints"], list)


def test_changed_input_or_model_files_are_refused_unless_fresh(tmp_path, tiny_model_dir, reviews_parquet):
    import os
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = _job(tmp_path, str(model), reviews_parquet)
    api.submit(path)
    st = os.stat(reviews_parquet)
    os.utime(reviews_parquet, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input file was replaced
    with pytest.raises(SpecError, match="holds results of a different job"):
        api.submit(path)
    assert api.submit(path, fresh=True).status == "ok"
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # the model changed
    with pytest.raises(SpecError, match="holds results of a different job"):
        api.submit(path)
