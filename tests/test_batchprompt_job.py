"""``mode: batchprompt`` through the Python API and the CLI: the spec's checks, the output rows and columns, row
errors, the summary and manifest, ``batchrun plan``, both engines giving the same labels, re-runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.errors import SpecError
from batchrun.io.sink import BATCHPROMPT_FIELDS, RESULT_FIELDS
from batchrun.spec import load_spec
from helpers import write_job

JOB = """
name: bp
mode: batchprompt
model: {{path: {model}}}
input: {{path: {data}, id: id}}
prompt: {{template: "{{{{ text }}}}", chat: false}}
batchprompt:
  instruction: Say whether each review is positive or negative.
  labels: [positive, negative]
  items_per_prompt: 2
  rounds: 3
  seed: 5
output: {{path: {out}, part_rows: 2}}
engine: {{device: cpu, backend: {backend}}}
"""


def _job(tmp_path: Path, model: str, data: Path, backend: str = "batchrun", name: str = "out") -> Path:
    return write_job(tmp_path, JOB.format(model=model, data=data, out=tmp_path / name, backend=backend))


def _rows(out: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT id, output, finish_reason, error, rounds, fallback, len(prompts) "
                      f"FROM '{out}/*.parquet' ORDER BY id").fetchall()


def test_rows_columns_errors_summary_and_manifest(tmp_path, tiny_model_dir, reviews_parquet):
    result = api.submit(load_spec(_job(tmp_path, tiny_model_dir, reviews_parquet)))
    assert (result.status, result.rows_total, result.rows_ok, result.rows_error) == ("ok", 6, 5, 1)
    out = tmp_path / "out"
    rows = _rows(out)
    assert [r[0] for r in rows] == ["a", "b", "c", "d", "e", "f"]
    assert rows[3] == ("d", None, "error", "column 'text' is null", 0, False, 0)
    for _, label, finish, error, rounds, fallback, prompts in rows[:3] + rows[4:]:
        assert label in ("positive", "negative") and (finish, error, fallback) == ("stop", None, False)
        assert 1 <= rounds <= 3 and prompts == rounds  # one prompt per round it took part in
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.names == ["id", "text", "lang", "budget", *(f.name for f in RESULT_FIELDS),
                            *(f.name for f in BATCHPROMPT_FIELDS)]
    votes, probs, conf = duckdb.sql(f"SELECT votes, label_probs, confidence FROM '{out}/*.parquet' "
                                    "WHERE id = 'a'").fetchall()[0]
    votes, probs = dict(votes), dict(probs)
    assert set(votes) == set(probs) == {"positive", "negative"}
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-6) and 0.5 <= conf <= 1.0
    b = result.batchprompt
    assert b["items"] == 5 and b["prompts_per_round"][0] == 3 and b["prompts"] == sum(b["prompts_per_round"])
    assert b["single_item"]["prompts"] == 5 and b["computed_tokens"] > 0 and b["fallback_prompts"] == 0
    assert result.prompt_tokens == b["prompt_tokens"] and result.output_tokens == b["output_tokens"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["batchprompt"] == b and (out / "_SUCCESS").exists()
    again = api.submit(load_spec(_job(tmp_path, tiny_model_dir, reviews_parquet)))
    assert again.status == "already_complete" and again.rows_skipped == 6


def test_both_engines_give_the_same_labels_votes_and_counts(tmp_path, tiny_model_dir, reviews_parquet):
    ours = api.submit(load_spec(_job(tmp_path, tiny_model_dir, reviews_parquet, name="ours")))
    ref = api.submit(load_spec(_job(tmp_path, tiny_model_dir, reviews_parquet, "reference", name="ref")))
    sql = "SELECT id, output, votes, rounds, prompts FROM '{}/*.parquet' ORDER BY id"
    assert duckdb.sql(sql.format(tmp_path / "ours")).fetchall() == duckdb.sql(sql.format(tmp_path / "ref")).fetchall()
    assert ours.batchprompt["prompts"] == ref.batchprompt["prompts"]


def test_plan_shows_the_instruction_and_the_rounds(tmp_path, tiny_model_dir, reviews_parquet):
    report = api.plan(_job(tmp_path, tiny_model_dir, reviews_parquet))
    b = report.batchprompt
    assert (b["layout"], b["items"], b["items_per_prompt"], b["rounds"]) == ("inline", 5, 2, 3)
    assert (b["first_round_prompts"], b["most_prompts"], b["single_item"]["prompts"]) == (3, 9, 5)
    assert b["instruction"] == "Say whether each review is positive or negative." and b["shared_prefix_tokens"] > 8
    assert report.rows == 6 and report.rows_error == 1


BAD = [
    ("", "batchprompt", "mode: batchprompt needs a batchprompt section"),
    ("mode: generate\n", "instruction: x\n  labels: [a, b]", "a batchprompt section needs mode: batchprompt"),
    ("", "instruction: x", "the inline layout needs labels"),
    ("", "instruction: x\n  layout: list\n  calibrate: true", "calibrate needs labels"),
    ("", "instruction: x\n  labels: [a, a]", "labels must be distinct"),
    ("", "instruction: x\n  labels: [a, b]\n  examples: [{item: y, label: c}]", "example label 'c' is not one of"),
    ("sampling: {n: 2}\n", "instruction: x\n  labels: [a, b]", "does not take sampling.n"),
    ("sampling: {temperature: 0.7}\n", "instruction: x\n  labels: [a, b]", "does not take sampling.temperature"),
    ("sampling: {stop: [x]}\n", "instruction: x\n  labels: [a, b]", "does not take sampling.stop"),
]


@pytest.mark.parametrize(("extra", "section", "message"), BAD)
def test_bad_batchprompt_specs_name_the_field(tmp_path, extra, section, message):
    body = (f"name: t\n{extra if extra.startswith('mode') else 'mode: batchprompt' + chr(10) + extra}"
            "model: {path: m}\ninput: {path: x.parquet}\nprompt: {template: '{{ t }}'}\noutput: {path: o}\n")
    if section != "batchprompt":
        body += f"batchprompt:\n  {section}\n"
    with pytest.raises(SpecError, match=message):
        load_spec(write_job(tmp_path, body))


def test_a_bad_item_template_and_a_multi_token_label_are_spec_errors(tmp_path, tiny_model_dir, reviews_parquet):
    path = _job(tmp_path, tiny_model_dir, reviews_parquet)
    with pytest.raises(SpecError, match=r"batchprompt.item_template: template syntax error"):
        api.validate(path, ["batchprompt.item_template=Review {{ n"])
    with pytest.raises(SpecError, match=r"batchprompt\.labels: label 'very unclear' is 2 tokens"):
        api.submit(path, ["batchprompt.labels=[positive, very unclear]"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_the_cli_plan_and_submit_of_a_batchprompt_job(tmp_path, tiny_model_dir, reviews_parquet):
    from click.testing import CliRunner

    from batchrun.cli import cli

    path = str(_job(tmp_path, tiny_model_dir, reviews_parquet))
    shown = CliRunner().invoke(cli, ["plan", path])
    assert shown.exit_code == 0, shown.output
    assert "batchprompt, inline layout: 5 items, 2 per prompt, up to 3 round(s) (SEAS)" in shown.output
    assert "3 prompts in the first round, at most 9 in all" in shown.output
    assert "'Say whether each review is positive or negative.'" in shown.output
    done = CliRunner().invoke(cli, ["submit", path, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    assert summary["rows_ok"] == 5 and summary["batchprompt"]["items"] == 5
