"""Hostile or careless job specs through the ``batchrun`` command: each ends quickly with the documented exit
code and a message naming the field or the row, never a traceback, a hang, or a file written.

The cases a tester reported: SQL confinement switched off by a file:// input path; templates that hang or
abort the process; a YAML alias bomb; names a template sets taken for input columns; awkward Arrow column
types; sampling values the engine cannot run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchrun.cli import cli
from helpers import write_job


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def job(tmp_path: Path, model: str, data: str, *, template: str = "Review: {{ text }}", extra: str = "",
        input_extra: str = "", name: str = "job.yaml") -> Path:
    return write_job(tmp_path, f"""\
model: {{path: "{model}"}}
input: {{path: "{data}"{input_extra}}}
prompt: {{template: {json.dumps(template)}}}
sampling: {{max_tokens: 2}}
output: {{path: "{tmp_path / 'out'}"}}
engine: {{device: cpu}}
{extra}""", name)


# ---------------------------------------------------------------------------------- 1. SQL confinement


def test_file_url_input_with_copy_is_refused_and_the_file_untouched(tmp_path, tiny_model_dir, reviews_parquet):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sql = f"COPY (SELECT 'pwned') TO '{victim}' (HEADER false)"
    path = job(tmp_path, tiny_model_dir, f"file://{reviews_parquet}", input_extra=f", sql: {json.dumps(sql)}")
    for command in ("plan", "submit"):
        r = run(command, path, "--json")
        assert r.exit_code == 65, r.output
        assert last_json(r)["error"] == "input.sql: must be one SELECT query; batchrun's SQL only reads (got COPY)"
    assert victim.read_text() == "precious"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.parquet"))


def test_file_url_input_is_read_like_a_local_path(tmp_path, tiny_model_dir, reviews_parquet):
    path = job(tmp_path, tiny_model_dir, f"file://{reviews_parquet}",
               input_extra=", sql: \"SELECT * FROM input WHERE lang = 'en'\", id: id")
    r = run("plan", path, "--json")
    assert r.exit_code == 0, r.output
    assert (last_json(r)["rows"], last_json(r)["rows_error"]) == (5, 1)


@pytest.mark.parametrize("url, problem", [
    ("ftp://example.com/x.parquet", "input.path: unsupported URL scheme 'ftp' (got 'ftp://example.com/x.parquet'); "
                                    "use a local path, file://, or one of http, https, s3, s3a, s3n, gs, gcs, r2, "
                                    "hf, az, azure, abfss"),
    ("file://server/share/x.parquet", "input.path: a file:// URL must name a local absolute path, file:///path "
                                      "(got 'file://server/share/x.parquet')"),
])
def test_unknown_or_non_local_scheme_is_a_spec_error(tmp_path, url, problem):
    r = run("validate", job(tmp_path, "m", url), "--json")
    assert r.exit_code == 78 and last_json(r)["problems"] == [problem]


# ------------------------------------------------------------------------------------ 2. templates


@pytest.mark.parametrize("template, problem", [
    ("{{ 7 ** 300000000 }}", "7 ** 300000000 would be over 16,384 bits"),
    ("{{ lipsum(n=10**7) }}", "lipsum() takes at most n=100 paragraphs of at most max=1000 words"),
    ("{{ 'a' * 10**9 }}", "repeating a str 1000000000 times would be over 4,000,000 characters or items"),
])
def test_templates_that_would_hang_or_abort_fail_validation_quickly(tmp_path, template, problem):
    start = time.monotonic()
    r = run("validate", job(tmp_path, "m", "x.parquet", template=template), "--json")
    assert r.exit_code == 78, r.output
    assert last_json(r)["problems"] == [f"prompt.template: {problem} (whatever the row)"]
    assert time.monotonic() - start < 5


def test_a_template_failing_every_row_fails_plan_with_78(tmp_path, tiny_model_dir, reviews_parquet):
    path = job(tmp_path, tiny_model_dir, str(reviews_parquet), template="{{ text }}{{ 7 ** 300000000 }}")
    start = time.monotonic()
    r = run("plan", path, "--json")
    assert r.exit_code == 78, r.output
    assert last_json(r)["error"] == ("prompt.template: the template goes past batchrun's limits the same way on "
                                     "each of the first 3 rows: 7 ** 300000000 would be over 16,384 bits")
    assert time.monotonic() - start < 30


def test_a_row_past_a_limit_is_a_row_error_and_the_job_completes(tmp_path, tiny_model_dir, reviews_parquet):
    template = "{{ text * (10**9 if id == 'b' else 1) }}"
    path = job(tmp_path, tiny_model_dir, str(reviews_parquet), template=template, input_extra=", id: id")
    r = run("submit", path, "--json")
    assert r.exit_code == 0, r.output
    assert (last_json(r)["rows_ok"], last_json(r)["rows_error"]) == (4, 2)  # b (the limit) and d (text is null)
    rows = dict(duckdb.sql(f"SELECT id, error FROM '{tmp_path}/out/*.parquet' WHERE finish_reason = 'error'")
                .fetchall())
    assert rows == {"b": "template error: TemplateLimitError: repeating a str 1000000000 times would be over "
                         "4,000,000 characters or items",
                    "d": "template error: TypeError: unsupported operand type(s) for *: 'NoneType' and 'int'"}


# --------------------------------------------------------------------------------------------- 3. YAML

BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 9) + "]\n" for i in range(10))


@pytest.mark.parametrize("use", ["name: *l9\n", "prompt: {template: *l9}\n"])
def test_alias_bomb_is_refused_quickly(tmp_path, use):
    body = BOMB + use + "model: {path: m}\ninput: {path: x.parquet}\noutput: {path: o}\n"
    if "prompt" not in use:
        body += "prompt: {template: x}\n"
    start = time.monotonic()
    r = run("validate", write_job(tmp_path, body), "--json")
    assert r.exit_code == 78, r.output
    assert "the document expands to more than 100,000 values through its aliases" in last_json(r)["error"]
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------- 4. template scoping


@pytest.mark.parametrize("template", [
    "{% if lang == 'en' %}{% set n = 'EN' %}{% endif %}{{ n }}: {{ text }}",
    "{% set n = 'ALL' %}{% if lang == 'en' %}{{ n }}: {{ text }}{% else %}{{ text }}{% endif %}",
    "{% for n in [lang] %}{{ n }}: {{ text }}{% endfor %}",
])
def test_validate_and_plan_agree_on_names_a_template_sets(tmp_path, tiny_model_dir, reviews_parquet, template):
    path = job(tmp_path, tiny_model_dir, str(reviews_parquet), template=template, input_extra=", id: id")
    assert run("validate", path).exit_code == 0
    r = run("plan", path, "--json")
    assert r.exit_code == 0, r.output
    # d: null text; e (lang 'de') reads n from the row in the first template, where it is undefined
    assert last_json(r)["rows_error"] == (2 if template.startswith("{% if") else 1)


# ----------------------------------------------------------------------------------- 5. column types


@pytest.fixture()
def awkward_parquet(tmp_path) -> Path:
    table = pa.table({
        "id": ["a", "b"], "text": ["Great kettle.", "Broke."],
        "ts": pa.array([1, 1_700_000_000_123_456_789], pa.timestamp("ns")),
        "far": pa.array([253_402_300_800_000, 0], pa.timestamp("ms")),
        "dec": pa.array([None, None], pa.decimal128(10, 2)),
        "nested": pa.array([{"a": 1}, {"a": 2}]), "blob": pa.array([b"x", b"y"], pa.large_binary()),
    })
    pq.write_table(table, tmp_path / "awkward.parquet")
    return tmp_path / "awkward.parquet"


def test_unused_awkward_columns_do_not_fail_prompt_building(tmp_path, tiny_model_dir, awkward_parquet):
    r = run("plan", job(tmp_path, tiny_model_dir, str(awkward_parquet), input_extra=", id: id"), "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r)["rows_error"] == 0


def test_used_awkward_column_is_a_row_error_found_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                           awkward_parquet):
    path = job(tmp_path, tiny_model_dir, str(awkward_parquet), template="{{ text }} at {{ ts }}",
               input_extra=", id: id")
    r = run("plan", path, "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r)["rows_error"] == 2


def test_submit_with_awkward_columns_left_out_of_the_output(tmp_path, tiny_model_dir, awkward_parquet):
    path = job(tmp_path, tiny_model_dir, str(awkward_parquet), input_extra=", id: id",
               extra="").read_text().replace(f"output: {{path: \"{tmp_path / 'out'}\"}}",
                                              f"output: {{path: \"{tmp_path / 'out'}\", columns: [text, dec]}}")
    r = run("submit", write_job(tmp_path, path), "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r)["rows_ok"] == 2


def test_submit_passes_awkward_columns_through_unconverted(tmp_path, tiny_model_dir, awkward_parquet):
    """Passthrough columns are copied as Arrow data: types and values arrive exactly as they were."""
    path = job(tmp_path, tiny_model_dir, str(awkward_parquet), input_extra=", id: id")
    r = run("submit", path, "--json")
    assert r.exit_code == 0, r.output
    want = pq.read_table(awkward_parquet)
    got = pa.concat_tables(pq.read_table(p) for p in sorted(Path(last_json(r)["output"]).glob("*.parquet")))
    got = got.sort_by("id").select(want.column_names)
    assert got.schema.field("ts").type == pa.timestamp("ns")  # (DuckDB reads large_binary as binary)
    assert got.cast(want.schema.remove_metadata()).equals(want.sort_by("id"))


# ------------------------------------------------------------------------------------- 6. sampling


@pytest.mark.parametrize("overrides, problems", [
    (["sampling.temperature=1.0e-45"], ["sampling.temperature: must be 0 (greedy) or >= 0.01 (got 1e-45)"]),
    (["sampling.temperature=1e-45"],
     ["sampling.temperature: must be a number (got '1e-45': YAML reads it as text; write 1.0e-45)"]),
    (["engine.kv_budget_tokens=1000000000000"],
     ["engine.kv_budget_tokens: must be <= 1000000000 (got 1000000000000)"]),
    (["engine.kv_budget_tokens=1.0e+12"], ["engine.kv_budget_tokens: must be an integer (got 1000000000000.0)"]),
    (["sampling.top_p=.nan", "sampling.top_k=-1"],
     ["sampling.top_p: must be a finite number (got NaN)", "sampling.top_k: must be >= 0 (got -1)"]),
])
def test_sampling_and_engine_values_the_engine_cannot_run(tmp_path, overrides, problems):
    args = [a for o in overrides for a in ("--set", o)]
    r = run("validate", job(tmp_path, "m", "x.parquet"), *args, "--json")
    assert r.exit_code == 78 and last_json(r)["problems"] == problems
