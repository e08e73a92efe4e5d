"""OpenAI Batch API files: reading every field of a request line (``io.openai_batch``), bad lines as row errors,
a job over such a file through the Python API, and ``batchrun export`` back to the Batch API's output and
error JSONL (a round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from batchrun import api
from batchrun.cli import cli
from batchrun.errors import SpecError
from batchrun.io.openai_batch import read_requests
from batchrun.spec import load_spec
from helpers import write_job

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
LINES = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-x", "messages": [{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "Say "},
                                                                          {"type": "text", "text": "hi."}]}],
              "max_completion_tokens": 3}},
    {"custom_id": "complete", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": ["Once upon a time"], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3,
              "n": 2, "logprobs": 2, "stop": "\n\n"}},
    {"custom_id": "json", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 12,
              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
              "logprobs": True, "top_logprobs": 1}},
    {"custom_id": "defaults", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
]
BAD = [
    ("not json", "line 5 is not JSON"),
    ('{"custom_id": "chat", "url": "/v1/completions", "body": {"prompt": "p"}}',
     "custom_id 'chat' is repeated (line 6); each must be unique"),
    ('{"url": "/v1/completions", "body": {"prompt": "p"}}', "line 7 has no custom_id (a non-empty string)"),
    ('{"custom_id": "emb", "url": "/v1/embeddings", "body": {}}',
     "url must be /v1/chat/completions or /v1/completions (got '/v1/embeddings')"),
    ('{"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}', "method must be POST (got 'GET')"),
    ('{"custom_id": "temp", "url": "/v1/completions", "body": {"prompt": "p", "temperature": -1}}',
     "body.temperature must be >= 0 (got -1)"),
    ('{"custom_id": "img", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": '
     '[{"type": "image_url", "image_url": {}}]}]}}', "body.messages[0].content: only text parts are supported"),
    ('{"custom_id": "top", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}],'
     ' "top_logprobs": 2}}', "body.top_logprobs needs logprobs: true"),
    ('{"custom_id": "fmt", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}],'
     ' "response_format": {"type": "yaml"}}}',
     "body.response_format.type must be text, json_object or json_schema (got 'yaml')"),
    ('{"custom_id": "many", "url": "/v1/completions", "body": {"prompt": "p", "n": 500}}',
     "body.n must be at most 128 (got 500)"),
]


def _write_requests(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    text = "\n".join([json.dumps(line) for line in LINES] + [""] + [b for b, _ in BAD]) + "\n"
    path.write_text(text.replace("\n\n", "\n", 1), encoding="utf-8")
    return path


def test_every_field_of_a_request_line_and_every_bad_line(tmp_path):
    rows = {r["custom_id"]: r for r in read_requests([str(_write_requests(tmp_path))]).to_pylist()}
    chat = rows["chat"]
    assert json.loads(chat["messages"]) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Say hi."}]
    assert (chat["url"], chat["max_tokens"], chat["prompt"], chat["n"], chat["logprobs"]) == (
        "/v1/chat/completions", 3, None, None, None)
    assert json.loads(chat["body"])["model"] == "gpt-x"
    done = rows["complete"]
    assert (done["prompt"], done["max_tokens"], done["temperature"], done["top_p"], done["seed"], done["n"],
            done["logprobs"], done["stop"], done["messages"]) == ("Once upon a time", 4, 0.7, 0.9, 3, 2, 2,
                                                                 ["\n\n"], None)
    assert json.loads(rows["json"]["constraint"]) == {"json_schema": SCHEMA} and rows["json"]["logprobs"] == 1
    assert [rows["defaults"][k] for k in ("max_tokens", "temperature", "stop", "constraint", "line_error")] == [
        None] * 5
    errors = {r["custom_id"]: r["line_error"] for r in rows.values() if r["line_error"]}
    got = sorted(errors.values())
    assert len(got) == len(BAD)
    for _, message in BAD:
        assert any(e.startswith(message) for e in got), message
    assert errors["line 5"].startswith("line 5 is not JSON") and "line 6" in errors and "line 7" in errors


JOB = """
name: ob
model: {{path: {model}}}
input: {{path: {data}, format: openai_batch}}
sampling: {{max_tokens: 5}}
output: {{path: {out}}}
engine: {{device: cpu}}
"""


def test_a_job_over_a_batch_file_and_its_export_round_trip(tmp_path, tiny_model_dir):
    data = _write_requests(tmp_path)
    out = tmp_path / "out"
    result = api.submit(write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=out)))
    # One output row per line (the completion line asks for two samples).
    assert (result.rows_total, result.rows_ok, result.rows_error) == (len(LINES) + len(BAD) + 1, len(LINES) + 1,
                                                                      len(BAD))
    rows = duckdb.sql(f"SELECT custom_id, sample, output_tokens, finish_reason, tokens, token_logprobs "
                      f"FROM '{out}/*.parquet' WHERE error IS NULL ORDER BY custom_id, sample").fetchall()
    by = {(r[0], r[1]): r for r in rows}
    assert by[("chat", 0)][2] <= 3 and by[("complete", 0)][2] <= 4 and by[("defaults", 0)][2] <= 5
    assert by[("json", 0)][3] == "stop" and len(by[("json", 0)][4]) == len(by[("json", 0)][5])

    # The export: one output line per good request (n choices each), one error line per bad one.
    target = tmp_path / "results.jsonl"
    done = CliRunner().invoke(cli, ["export", str(out), "--format", "openai_batch", "--output", str(target)])
    assert done.exit_code == 0, done.output
    outputs = [json.loads(x) for x in target.read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == ["chat", "complete", "json", "defaults"]
    assert len(errors) == len(BAD) and all(e["response"]["status_code"] == 400 for e in errors)
    assert {e["custom_id"] for e in errors} >= {"line 5", "emb", "get", "temp", "img", "top", "fmt", "many"}
    texts = dict(duckdb.sql(f"SELECT custom_id || '/' || sample, output FROM '{out}/*.parquet' "
                            "WHERE error IS NULL").fetchall())
    chat, complete, js = outputs[0]["response"]["body"], outputs[1]["response"]["body"], outputs[2]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "gpt-x" and len(chat["choices"]) == 1
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": texts["chat/0"], "refusal": None}
    assert chat["choices"][0]["logprobs"] is None
    assert complete["object"] == "text_completion" and [c["text"] for c in complete["choices"]] == [
        texts["complete/0"], texts["complete/1"]]
    assert [len(t) for t in complete["choices"][0]["logprobs"]["top_logprobs"]] == [2] * len(
        complete["choices"][0]["logprobs"]["tokens"])
    assert complete["usage"]["completion_tokens"] == by[("complete", 0)][2] + by[("complete", 1)][2]
    assert json.loads(js["choices"][0]["message"]["content"]) in ({"ok": True}, {"ok": False})
    content = js["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(by[("json", 0)][4]) and all(len(c["top_logprobs"]) == 1
                                                                            for c in content)


def test_a_chat_line_gives_what_a_template_job_with_the_same_message_gives(tmp_path, tiny_model_dir, reviews_parquet):
    data = tmp_path / "r.jsonl"
    texts = duckdb.sql(f"SELECT id, text FROM '{reviews_parquet}' WHERE text IS NOT NULL ORDER BY id").fetchall()
    data.write_text("".join(json.dumps({"custom_id": i, "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": f"Review: {t}"}], "max_tokens": 4}}) + "\n" for i, t in texts))
    api.submit(write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=tmp_path / "a"), "a.yaml"))
    job = (f"name: b\nmodel: {{path: {tiny_model_dir}}}\ninput: {{path: {reviews_parquet}, id: id, sql: "
           "'SELECT * FROM input WHERE text IS NOT NULL'}\nprompt: {template: 'Review: {{ text }}', chat: true}\n"
           f"sampling: {{max_tokens: 4}}\noutput: {{path: {tmp_path / 'b'}}}\nengine: {{device: cpu}}\n")
    api.submit(write_job(tmp_path, job, "b.yaml"))
    a = duckdb.sql(f"SELECT custom_id, output, prompt_tokens FROM '{tmp_path / 'a'}/*.parquet' ORDER BY 1").fetchall()
    b = duckdb.sql(f"SELECT id, output, prompt_tokens FROM '{tmp_path / 'b'}/*.parquet' ORDER BY 1").fetchall()
    assert a == b and len(a) == 5


@pytest.mark.parametrize(("extra", "message"), [
    ("prompt: {template: x}\n", "does not take prompt"),
    ("sampling: {max_tokens: budget}\n", "does not take sampling.max_tokens naming a column"),
])
def test_spec_errors_of_a_batch_file_job(tmp_path, extra, message):
    body = f"name: t\nmodel: {{path: m}}\ninput: {{path: x.jsonl, format: openai_batch}}\noutput: {{path: o}}\n{extra}"
    with pytest.raises(SpecError) as ei:
        load_spec(write_job(tmp_path, body))
    assert any(message in p for p in ei.value.problems), ei.value.problems


def test_export_refuses_what_it_cannot_export(tmp_path, tiny_model_dir, reviews_parquet):
    with pytest.raises(SpecError, match="no batchrun job's output"):
        api.export(tmp_path / "missing", "openai_batch", tmp_path / "x.jsonl")
    job = (f"name: c\nmodel: {{path: {tiny_model_dir}}}\ninput: {{path: {reviews_parquet}, id: id}}\n"
           f"prompt: {{template: 'x {{{{ lang }}}}'}}\nsampling: {{max_tokens: 1}}\n"
           f"output: {{path: {tmp_path / 'c'}}}\nengine: {{device: cpu}}\n")
    api.submit(write_job(tmp_path, job, "c.yaml"))
    with pytest.raises(SpecError, match=r"not the output of a job with input\.format openai_batch"):
        api.export(tmp_path / "c", "openai_batch", tmp_path / "x.jsonl")
