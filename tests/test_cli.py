"""The ``batchrun`` command through click's CliRunner: exit codes, messages, --json, and one real end-to-end
job with the tiny random model on CPU (submit, resubmit, --fresh, status, plan)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.cli import cli
from helpers import write_job

TEMPLATE = "Review: {{ text }}"
TEXTS = {"a": "Great kettle, boils fast.", "b": "Broke after a day.", "c": "It is a cable.", "d": None,
         "e": "Fantastic sound, comfy fit.", "f": "Terrible support, never again."}
COLUMNS = ["id", "text", "lang", "budget",  # the id, then the passthrough columns, then the results
           "output", "prompt_tokens", "output_tokens", "finish_reason", "error"]


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def job_yaml(tmp_path: Path, model: str, data: Path | str, out: Path, name: str = "job.yaml") -> Path:
    return write_job(tmp_path, f"""\
model: {{path: "{model}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "{TEMPLATE}"}}
sampling: {{max_tokens: 3}}
output: {{path: "{out}"}}
engine: {{device: cpu}}
""", name)


@pytest.fixture()
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def prompt_tokens(tok, text: str) -> int:
    chat = tok.apply_chat_template([{"role": "user", "content": f"Review: {text}"}], tokenize=False,
                                   add_generation_prompt=True)
    return len(tok(chat, add_special_tokens=False)["input_ids"])


def read_output(out: Path) -> tuple[list[str], list[tuple]]:
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{out}/*.parquet') ORDER BY id")
    return rel.columns, rel.fetchall()


# ------------------------------------------------------------------------------------------- validate

BROKEN = """\
model: {path: m, dtype: int8}
input: {path: data.parquet}
prompt: {template: "{{ text }}", bogus: 1}
sampling: {temperature: 5}
output: {path: out}
"""
BROKEN_PROBLEMS = [
    "model.dtype: must be one of 'auto', 'float32', 'bfloat16' or 'float16' (got 'int8')",
    "prompt.bogus: unknown field (allowed here: template, system, chat, fewshot)",
    "sampling.temperature: must be <= 2 (got 5)",
]


def test_validate_good_spec(tmp_path, reviews_parquet):
    job = job_yaml(tmp_path, "m", reviews_parquet, tmp_path / "out")
    r = run("validate", job, "--json")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].startswith(f"{job}: valid (job 'job', spec hash ")
    d = last_json(r)
    assert (d["status"], d["exit_code"], d["job"], len(d["spec_hash"])) == ("ok", 0, "job", 16)
    assert d["spec"]["sampling"]["max_tokens"] == 3 and d["spec"]["engine"]["device"] == "cpu"


def test_validate_broken_spec_lists_every_problem(tmp_path):
    job = write_job(tmp_path, BROKEN, "broken.yaml")
    r = run("validate", job)
    assert r.exit_code == 78 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {job}: 3 problem(s) in the job spec"] + [f"  - {p}" for p in
                                                                                      BROKEN_PROBLEMS]
    r = run("validate", job, "--json")
    assert r.exit_code == 78
    assert last_json(r) == {"status": "error", "exit_code": 78, "kind": "invalid_spec",
                            "error": f"{job}: 3 problem(s) in the job spec", "problems": BROKEN_PROBLEMS}


def test_validate_template_syntax_error(tmp_path):
    job = write_job(tmp_path, BROKEN.replace("int8", "auto").replace(", bogus: 1", "").replace("5}", "1}")
                    .replace("{{ text }}", "{{ text "))
    r = run("validate", job, "--json")
    assert r.exit_code == 78
    assert last_json(r)["problems"] == ["prompt.template: template syntax error at line 1: unexpected end of "
                                        "template, expected 'end of print statement'."]


def test_validate_missing_file_is_usage_error(tmp_path):
    r = run("validate", tmp_path / "nope.yaml", "--json")
    assert r.exit_code == 2
    assert r.stderr == f"error: job file not found: {tmp_path / 'nope.yaml'}\n"
    assert last_json(r)["kind"] == "usage_error"


def test_set_malformed_is_usage_error_and_unknown_field_is_spec_error(tmp_path, reviews_parquet):
    job = job_yaml(tmp_path, "m", reviews_parquet, tmp_path / "out")
    r = run("validate", job, "--set", "oops")
    assert r.exit_code == 2
    assert r.stderr == "error: --set expects FIELD=VALUE, e.g. sampling.max_tokens=16 (got 'oops')\n"
    r = run("validate", job, "--set", "sampling.bogus=1", "--json")
    assert r.exit_code == 78
    assert last_json(r)["problems"] == ["sampling.bogus: unknown field (allowed here: max_tokens, "
                                        "temperature, top_p, top_k, stop, seed, n, logprobs, ignore_eos, constraint)"]
    r = run("validate", job, "--set", "sampling.max_tokens=9", "--json")
    assert r.exit_code == 0 and last_json(r)["spec"]["sampling"]["max_tokens"] == 9


# --------------------------------------------------------------------------------------------- status


def test_status_missing_empty_and_foreign_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    for name, state in (("none", "missing"), ("empty", "empty"), ("foreign", "not_batchrun")):
        r = run("status", tmp_path / name, "--json")
        assert r.exit_code == 0
        assert r.stdout.splitlines()[0] == f"{tmp_path / name}: {state}, 0 rows in 0 part file(s)"
        assert last_json(r) == {"status": "ok", "exit_code": 0, "output": str(tmp_path / name),
                                "state": state, "rows_committed": 0, "parts": 0}


# --------------------------------------------------------------------------------------------- submit


def test_submit_end_to_end_resubmit_fresh_and_status(tmp_path, tiny_model_dir, reviews_parquet, tok):
    out = tmp_path / "out"
    job = job_yaml(tmp_path, tiny_model_dir, reviews_parquet, out)
    r = run("submit", job, "--json")
    assert r.exit_code == 0, r.stderr
    d = last_json(r)
    expected_prompt = sum(prompt_tokens(tok, t) for t in TEXTS.values() if t is not None)
    assert (d["status"], d["exit_code"], d["job"], d["output"]) == ("ok", 0, "job", str(out))
    assert (d["rows_total"], d["rows_ok"], d["rows_error"], d["rows_skipped"]) == (6, 5, 1, 0)
    assert (d["prompt_tokens"], d["output_tokens"]) == (expected_prompt, 15)

    columns, rows = read_output(out)
    assert columns == COLUMNS
    assert [r_[0] for r_ in rows] == list(TEXTS)
    for row in rows:
        rid, text, lang, budget, output, n_prompt, n_out, finish, error = row
        assert text == TEXTS[rid]
        if text is None:
            assert (output, n_prompt, n_out, finish) == (None, None, 0, "error")
            assert error == "column 'text' is null"
        else:
            assert isinstance(output, str) and output
            assert (n_prompt, n_out, finish, error) == (prompt_tokens(tok, text), 3, "length", None)
    assert [(r_[2], r_[3]) for r_ in rows] == [("en", 3), ("en", 2), ("en", 4), ("en", 3), ("de", 1),
                                               ("en", 5)]

    r = run("submit", job, "--json")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == f"job: already complete (6 rows in {out}); use --fresh to rebuild"
    d = last_json(r)
    assert (d["status"], d["rows_total"], d["rows_skipped"], d["rows_ok"]) == ("already_complete", 6, 6, 0)
    assert read_output(out)[1] == rows

    r = run("submit", job, "--fresh", "--json")
    assert r.exit_code == 0
    d = last_json(r)
    assert (d["status"], d["rows_ok"], d["rows_error"], d["rows_skipped"]) == ("ok", 5, 1, 0)
    assert read_output(out)[1] == rows  # same job, same input, same seed: same rows, no duplicates
    assert sorted(p.name for p in out.iterdir()) == [".lock", "_SUCCESS", "_batchrun_job.json",
                                                     "_manifest.json", "part-000000.parquet"]

    r = run("status", out, "--json")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == f"{out}: complete, 6 rows in 1 part file(s)"
    st = last_json(r)
    assert (st["state"], st["rows_committed"], st["job"]) == ("complete", 6, "job")
    assert st["rows"] == {"total": 6, "ok": 5, "error": 1, "this_run": 6, "from_earlier_runs": 0}
    assert st["tokens"] == {"prompt": expected_prompt, "output": 15}

    r = run("submit", job, "--set", "sampling.max_tokens=4")  # another job's results: refused, kept
    assert r.exit_code == 78
    assert r.stderr == (f"error: output.path: {out} holds results of a different job (the model, input, "
                        "prompt or sampling changed); rerun with --fresh to rebuild it, or choose another "
                        "output.path\n")
    assert read_output(out)[1] == rows


def test_submit_missing_input_exits_65(tmp_path):
    out = tmp_path / "out"
    job = job_yaml(tmp_path, "unused-model", tmp_path / "missing.parquet", out)
    r = run("submit", job, "--json")
    assert r.exit_code == 65
    message = f"input.path: file not found: '{tmp_path / 'missing.parquet'}' (from {os.getcwd()})"
    assert r.stderr == f"error: {message}\n"
    assert last_json(r) == {"status": "error", "exit_code": 65, "kind": "input_error", "error": message,
                            "problems": []}


def test_status_after_failed_submit_is_empty(tmp_path):
    out = tmp_path / "out"
    assert run("submit", job_yaml(tmp_path, "m", tmp_path / "missing.parquet", out)).exit_code == 65
    assert last_json(run("status", out, "--json"))["state"] == "empty"


def test_submit_into_foreign_directory_exits_78(tmp_path, reviews_parquet):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run("submit", job_yaml(tmp_path, "unused-model", reviews_parquet, out))
    assert r.exit_code == 78
    assert r.stderr == (f"error: output.path: {out} holds files batchrun did not write (notes.txt); "
                        "choose an empty or new directory\n")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # (not even a lock file is created)


def test_submit_while_output_locked_exits_75(tmp_path, reviews_parquet):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run("submit", job_yaml(tmp_path, "unused-model", reviews_parquet, out), "--json")
    finally:
        os.close(fd)
    assert r.exit_code == 75
    message = f"output {out} is locked by another batchrun process; retry when it has finished"
    assert r.stderr == f"error: {message}\n"
    assert last_json(r) == {"status": "error", "exit_code": 75, "kind": "temporary_failure", "error": message,
                            "problems": []}
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ----------------------------------------------------------------------------------------------- plan


def test_plan_prints_rows_tokens_and_sharing(tmp_path, tiny_model_dir, reviews_parquet, tok):
    out = tmp_path / "out"
    job = job_yaml(tmp_path, tiny_model_dir, reviews_parquet, out)
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": f"Review: {t}"}], tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for t in TEXTS.values() if t is not None]
    unique = len({tuple(r[:k]) for r in ids for k in range(1, len(r) + 1)})
    r = run("plan", job, "--json", "--set", "engine.kv_budget_tokens=256")
    assert r.exit_code == 0, r.stderr
    report = last_json(r)
    assert {k: report[k] for k in ("job", "rows", "rows_error", "prompt_tokens", "unique_tokens",
                                   "max_output_tokens", "kv_budget_tokens", "rows_too_big")} == {
        "job": "job", "rows": 6, "rows_error": 1, "prompt_tokens": sum(map(len, ids)), "unique_tokens": unique,
        "max_output_tokens": 15, "kv_budget_tokens": 256, "rows_too_big": 0}
    # The chat template's system block is shared by all five prompts.
    assert report["shared_prefixes"] >= 1 and report["prefill_tokens"] < report["prompt_tokens"]
    lines = r.stdout.splitlines()
    assert lines[0] == "job: plan"
    assert lines[1] == "  rows             6 (1 fail before the engine)"
    assert f"  unique tokens    {unique:,} (nodes of the prefix trie)" in lines
    assert not out.exists()  # a dry run writes nothing

    r = run("plan", job, "--set", "sampling.max_tokens=budget")
    assert r.exit_code == 0
    assert "  output tokens    at most 15" in r.stdout.splitlines()  # 3 + 2 + 4 + 1 + 5: row d fails


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("abz:{}[]-, \n'\"!&*#|>%@`0123456789.")), max_size=80))
def test_any_job_file_gives_a_clean_exit_never_a_traceback(tmp_path, body):
    path = tmp_path / "fuzz.yaml"
    path.write_text(body, encoding="utf-8")
    r = run("validate", path, "--json")
    assert r.exit_code in (0, 2, 78), r.output
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert last_json(r)["exit_code"] == r.exit_code


@pytest.mark.parametrize("args, message", [
    (["submit", "--bogus", "x"], "No such option '--bogus'"),
    (["submit", "{tmp}"], "is a directory"),
    (["status", "{file}"], "is a file"),
    (["plan"], "Missing argument 'JOB'"),
])
def test_command_line_errors_still_end_with_the_json_line(tmp_path, args, message):
    """--json promises one JSON object as the last stdout line, also when click rejects the command line."""
    (tmp_path / "f.txt").write_text("x")
    args = [a.format(tmp=tmp_path, file=tmp_path / "f.txt") for a in args] + ["--json"]
    result = run(*args)
    assert result.exit_code == 2
    out = last_json(result)
    assert (out["status"], out["exit_code"], out["kind"]) == ("error", 2, "usage_error")
    assert message in out["error"]


def test_without_json_a_command_line_error_prints_usage_only():
    result = run("submit", "--bogus", "x")
    assert result.exit_code == 2 and "No such option" in result.stderr and result.stdout == ""
