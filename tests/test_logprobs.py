"""``sampling.logprobs``: each chosen token's log-probability under the model and its top-k alternatives, the
same from batchrun's engine and the reference engine, equal to a plain forward pass, and written as
``token_logprobs`` / ``top_logprobs`` columns by ``submit``."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchrun import api
from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import compile_constraint
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams, row_seed
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import load_spec
from batchrun.tokens import TokenTable
from helpers import write_job

TOL = 1e-4  # fp32 on CPU: the engines differ only in summation order


def _requests(tok, constraint=None) -> list[Request]:
    ids = tok([f"Item {i}: tell me more about it." for i in range(5)], add_special_tokens=False)["input_ids"]
    return [Request(key=i, prompt_ids=p, max_tokens=6 + i, seed=row_seed(0, i),
                    constraint=None if constraint is None else constraint.new()) for i, p in enumerate(ids)]


def _both(loaded, params, constraint=None) -> tuple[dict, dict]:
    reqs = _requests(loaded.tokenizer, constraint)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    ours = {c.key: c for b in BatchEngine(loaded, params, 100_000, 4, 64).run(reqs, plan) for c in b}
    ref = {c.key: c for b in ReferenceEngine(loaded, params, batch_size=3).run(_requests(loaded.tokenizer,
                                                                                         constraint)) for c in b}
    return ours, ref


def _forward_logprobs(loaded, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at each generated position, by one plain forward pass."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], -1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_both_engines_report_the_models_logprobs(tiny_fp32, temperature):
    params = SamplingParams(temperature=temperature, logprobs=3)
    ours, ref = _both(tiny_fp32, params)
    reqs = _requests(tiny_fp32.tokenizer)
    for r in reqs:
        a, b = ours[r.key], ref[r.key]
        assert a.token_ids == b.token_ids and len(a.logprobs) == len(a.token_ids) == len(a.top_logprobs)
        want = _forward_logprobs(tiny_fp32, r.prompt_ids, a.token_ids)
        chosen = want.gather(1, torch.tensor(a.token_ids)[:, None])[:, 0].tolist()
        assert np.allclose(a.logprobs, chosen, atol=TOL) and np.allclose(b.logprobs, chosen, atol=TOL)
        for j, (top_a, top_b) in enumerate(zip(a.top_logprobs, b.top_logprobs)):
            assert [t[0] for t in top_a] == [t[0] for t in top_b] == want[j].topk(3).indices.tolist()
            assert [t[1] for t in top_a] == [tiny_fp32.tokenizer.decode([t[0]]) for t in top_a]
            assert np.allclose([t[2] for t in top_a], want[j].topk(3).values.tolist(), atol=TOL)
            if temperature == 0.0:  # greedy: the chosen token is the most likely one
                assert top_a[0][0] == a.token_ids[j]


def test_logprobs_under_a_constraint_are_the_models_own(tiny_fp32):
    """The constraint masks what may be chosen, not the reported probabilities; forced tokens are drawn one
    by one (each needs its own logprob), and the tokens still equal the reference engine's."""
    compiled = compile_constraint("regex", "[0-9]{3}", tiny_fp32.tokenizer)
    ours, ref = _both(tiny_fp32, SamplingParams(logprobs=0), compiled)
    for k, c in ours.items():
        assert c.token_ids == ref[k].token_ids and np.allclose(c.logprobs, ref[k].logprobs, atol=TOL)
        assert c.top_logprobs == [[] for _ in c.token_ids]
        assert all(lp <= 0 for lp in c.logprobs)


JOB = """
model: {{path: {model}, dtype: float32}}
input: {{path: {data}}}
prompt: {{template: "{{{{ text }}}}", chat: false}}
sampling: {sampling}
output: {{path: {out}}}
engine: {{device: cpu}}
"""


@pytest.mark.parametrize("k", [0, 2])
def test_submit_writes_logprob_columns(tmp_path, tiny_model_dir, k):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["Hello there", None, "A kettle review"]}), data)
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB.format(model=tiny_model_dir, data=data, out=out,
                                         sampling=json.dumps({"max_tokens": 5, "logprobs": k})))
    result = api.submit(load_spec(job))
    assert (result.rows_ok, result.rows_error) == (2, 1)
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert ("top_logprobs" in schema.names) == (k > 0)
    rel = duckdb.sql(f"SELECT * FROM '{out}/*.parquet' ORDER BY id")
    rows = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
    assert rows[1]["token_logprobs"] is None  # the error row
    for r in (rows[0], rows[2]):
        assert len(r["token_logprobs"]) == r["output_tokens"] == 5 and all(v <= 0 for v in r["token_logprobs"])
        if k:
            assert [len(top) for top in r["top_logprobs"]] == [k] * 5
            assert set(r["top_logprobs"][0][0]) == {"token_id", "token", "logprob"}
