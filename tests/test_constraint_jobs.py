"""Constraints through ``batchrun submit``: the ``output_json`` column, per-row constraints from a column, a
row cut before its grammar is complete, spec errors, and what ``batchrun plan`` and the manifest report."""

from __future__ import annotations

import json
import re

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.errors import SpecError
from batchrun.spec import load_spec, validate_dict
from helpers import SENTIMENT, make_tiny_model, valid_against, write_job

JOB = """
model: {{path: {model}, dtype: float32}}
input: {{path: {data}}}
prompt: {{template: "Review: {{{{ text }}}}", chat: false}}
sampling:
  max_tokens: {max_tokens}
  constraint: {constraint}
output: {{path: {out}}}
engine: {{device: cpu}}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_model(tmp_path_factory.mktemp("llama-dir"), "llama", tokenizer_dir, seed=3)


def _data(tmp_path, **columns):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(columns["text"]))), **columns}), path)
    return path


def _submit(tmp_path, tiny_dir, constraint, max_tokens=40, **columns):
    columns.setdefault("text", ["good", "bad", "fine", "awful"])
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB.format(model=tiny_dir, data=_data(tmp_path, **columns), out=out,
                                         max_tokens=max_tokens, constraint=json.dumps(constraint)))
    result = api.submit(load_spec(job))
    rel = duckdb.sql(f"SELECT * FROM '{out}/*.parquet' ORDER BY id")
    return result, [dict(zip(rel.columns, row)) for row in rel.fetchall()], out


def test_submit_with_a_json_schema_writes_output_json(tmp_path, tiny_dir):
    result, rows, out = _submit(tmp_path, tiny_dir, {"json_schema": SENTIMENT})
    assert (result.rows_ok, result.rows_error) == (4, 0)
    cols = duckdb.sql(f"SELECT * FROM '{out}/*.parquet'").columns
    assert cols[-2:] == ["error", "output_json"]
    for row in rows:
        assert (row["finish_reason"], row["error"]) == ("stop", None)
        parsed = row["output_json"]  # a struct: the schema fixes the types
        assert parsed == json.loads(row["output"]) and valid_against(parsed, SENTIMENT)
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("output_json").type == pa.struct([("label", pa.string()), ("score", pa.int64())])
    label = duckdb.sql(f"SELECT output_json.label FROM '{out}/*.parquet' ORDER BY id").fetchall()
    assert [v for (v,) in label] == [json.loads(r["output"])["label"] for r in rows]


def test_a_schema_without_fixed_types_gives_output_json_as_text(tmp_path, tiny_dir):
    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"]}
    result, rows, out = _submit(tmp_path, tiny_dir, {"json_schema": schema}, max_tokens=40)
    assert pq.read_schema(next(out.glob("part-*.parquet"))).field("output_json").type == pa.string()
    for row in rows:
        if row["error"] is None:
            assert json.loads(row["output_json"]) == json.loads(row["output"])


def test_an_output_cut_before_its_grammar_is_complete_is_a_row_error(tmp_path, tiny_dir):
    result, rows, _ = _submit(tmp_path, tiny_dir, {"json_schema": SENTIMENT}, max_tokens=2)
    assert (result.rows_ok, result.rows_error) == (0, 4)  # (errors, though their finish_reason is "length")
    for row in rows:
        assert (row["finish_reason"], row["output_json"], row["output_tokens"]) == ("length", None, 2)
        assert row["error"] == "the output reached max_tokens before its json_schema constraint was complete"


def test_per_row_constraints_come_from_a_column(tmp_path, tiny_dir):
    rules = [json.dumps({"regex": "[0-9]{4}"}), None, json.dumps({"choices": ["up", "down"]}),
             json.dumps({"regex": "[0-9"})]
    result, rows, _ = _submit(tmp_path, tiny_dir, {"column": "rule"}, max_tokens=12, rule=rules)
    assert (result.rows_ok, result.rows_error) == (3, 1)
    assert re.fullmatch("[0-9]{4}", rows[0]["output"]) and rows[0]["error"] is None
    assert rows[1]["error"] is None and rows[1]["output_tokens"] == 12  # null: unconstrained
    assert rows[2]["output"] in ("up", "down")
    assert rows[3]["finish_reason"] == "error" and rows[3]["error"].startswith("constraint column 'rule': regex: ")
    assert "unclosed character class" in rows[3]["error"]


@pytest.mark.parametrize("constraint, problem", [
    ({"regex": "x", "choices": ["a"]},
     "sampling.constraint: give exactly one of json_schema, regex, choices, grammar or column (got regex, choices)"),
    ({}, "sampling.constraint: give exactly one of json_schema, regex, choices, grammar or column (got none)"),
    ({"choices": ["a", "a"]}, "sampling.constraint.choices: choices must be distinct (got [\"a\", \"a\"])"),
    ({"choices": ["a", ""]}, "sampling.constraint.choices: choices must not be empty strings"),
])
def test_constraint_spec_errors(constraint, problem):
    raw = {"name": "j", "model": {"path": "m"}, "input": {"path": "a.parquet"}, "prompt": {"template": "x"},
           "sampling": {"constraint": constraint}, "output": {"path": "out"}}
    with pytest.raises(SpecError) as ei:
        validate_dict(raw)
    assert ei.value.problems == [problem]


def test_ignore_eos_with_a_constraint_is_a_spec_error():
    raw = {"name": "j", "model": {"path": "m"}, "input": {"path": "a.parquet"}, "prompt": {"template": "x"},
           "sampling": {"ignore_eos": True, "constraint": {"choices": ["a", "b"]}}, "output": {"path": "out"}}
    with pytest.raises(SpecError) as ei:
        validate_dict(raw)
    assert ei.value.problems == ["sampling: ignore_eos cannot be used with a constraint: once the constraint is "
                                 "complete it allows only EOS (remove one of them)"]


@pytest.mark.parametrize("constraint, message", [
    ({"regex": "[a-z"}, "sampling.constraint.regex: at 1(8): invalid regex"),
    ({"json_schema": "missing.json"}, "sampling.constraint.json_schema: no such file 'missing.json'"),
    ({"json_schema": "{not json"}, "sampling.constraint.json_schema: not valid JSON"),
])
def test_a_constraint_that_does_not_compile_stops_the_job_before_any_row(tmp_path, tiny_dir, constraint, message):
    with pytest.raises(SpecError) as ei:
        _submit(tmp_path, tiny_dir, constraint)
    assert ei.value.message.startswith(message)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_plan_and_the_manifest_report_the_constraint(tmp_path, tiny_dir):
    from click.testing import CliRunner

    from batchrun.cli import cli

    result, rows, out = _submit(tmp_path, tiny_dir, {"regex": "[0-9]{4}"}, max_tokens=8)
    manifest = json.loads((out / "_manifest.json").read_text())
    c = manifest["constraint"]
    generated = sum(r["output_tokens"] for r in rows)  # a mask per token chosen (EOS included)
    assert (c["kind"], c["rows"], c["grammars"]) == ("regex", 4, 1) and c["masks"] == generated + len(rows)
    assert (c["drawn_before_mask"], c["drawn_before_mask_allowed"]) == (0, 0)  # (digits: no wide mask)
    assert 3 <= c["masks_shared"] < c["masks"]  # (the 4 rows' first masks at least: one computed, 3 copied)
    assert c["mask_s"] >= 0 and result.constraint == c
    job = tmp_path / "job.yaml"
    r = CliRunner().invoke(cli, ["plan", str(job), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: report["constraint"][k] for k in ("kind", "rows", "grammars")} == {"kind": "regex", "rows": 4,
                                                                                   "grammars": 1}
    assert "constraint       regex on 4 rows (1 grammar(s) compiled in" in r.stdout
