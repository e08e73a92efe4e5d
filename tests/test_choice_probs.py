"""``choice_probs``: with a ``choices`` constraint, every choice's probability (full sequence, renormalized
over the choices) — equal to plain forward passes, one sequence at a time, and written as a map column."""

from __future__ import annotations

import json
import math

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchrun import api
from batchrun.engine.scoring import choice_probs, sequence_logprobs
from batchrun.spec import load_spec
from helpers import write_job

CHOICES = ["yes", "no", "no way", "maybe"]


def _one_at_a_time(loaded, prompt, cont) -> float:
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        lp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def test_sequence_logprobs_equal_one_forward_pass_per_sequence(tiny_fp32):
    tok = tiny_fp32.tokenizer
    prompt = tok("Is the kettle any good? Answer:", add_special_tokens=False)["input_ids"]
    conts = [tok(" " + c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in CHOICES]
    got = sequence_logprobs(tiny_fp32, prompt, conts, batch_size=3)  # (two batches, right-padded)
    assert got == pytest.approx([_one_at_a_time(tiny_fp32, prompt, c) for c in conts], abs=1e-4)


def test_choice_probs_are_renormalized_full_sequence_probabilities(tiny_fp32):
    tok = tiny_fp32.tokenizer
    prompt = tok("Is the kettle any good? Answer:", add_special_tokens=False)["input_ids"]
    probs = choice_probs(tiny_fp32, prompt, CHOICES, end=[tok.eos_token_id])
    assert list(probs) == CHOICES and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
    raw = [_one_at_a_time(tiny_fp32, prompt, tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
           for c in CHOICES]
    want = torch.softmax(torch.tensor(raw, dtype=torch.float64), 0).tolist()
    assert list(probs.values()) == pytest.approx(want, abs=1e-5)


JOB = """
model: {{path: {model}, dtype: float32}}
input: {{path: {data}}}
prompt: {{template: "Review: {{{{ text }}}} Sentiment:", chat: false}}
sampling: {{max_tokens: 8, constraint: {{choices: {choices}}}}}
output: {{path: {out}}}
engine: {{device: cpu}}
"""


def test_submit_with_choices_writes_choice_probs(tmp_path, tiny_model_dir):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["Great kettle.", None, "Broke in a day."]}), data)
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=out, choices=json.dumps(CHOICES)))
    result = api.submit(load_spec(job))
    assert (result.rows_ok, result.rows_error) == (2, 1)
    assert pq.read_schema(next(out.glob("part-*.parquet"))).field("choice_probs").type == pa.map_(
        pa.string(), pa.float64())
    rel = duckdb.sql(f"SELECT id, output, map_keys(choice_probs), map_values(choice_probs) FROM '{out}/*.parquet' "
                     "ORDER BY id")
    rows = rel.fetchall()
    assert rows[1][2] is None or rows[1][2] == []  # the error row
    for _, output, keys, values in (rows[0], rows[2]):
        assert output in CHOICES and keys == CHOICES and math.isclose(sum(values), 1.0, abs_tol=1e-9)
