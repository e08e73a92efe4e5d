"""The one preparation path and the one KV budget rule: ``plan`` and ``submit`` agree on the budget and the KV
peak; prepare's requests and row errors are what the job emits; the CUDA rule's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun import api
from batchrun.engine import factory, loader
from batchrun.engine.loader import ModelFacts
from batchrun.engine.requests import Request
from batchrun.errors import SpecError
from batchrun.runtime.prepare import prepare
from batchrun.spec import EngineSpec, ModelSpec, load_spec
from helpers import write_job

JOB = """
name: p
model: {{path: "{model}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Review: {{{{ text }}}}", chat: false}}
sampling: {{max_tokens: budget, ignore_eos: true}}
output: {{path: "{out}"}}
engine: {{device: {device}, step_tokens: 16, block_size: 4}}
"""


def _job(tmp_path: Path, model: str, data: Path, device: str = "cpu") -> Path:
    return write_job(tmp_path, JOB.format(model=model, data=data, out=tmp_path / "out", device=device))


@pytest.mark.parametrize("device, overrides", [("auto", []), ("cpu", []),
                                               ("cpu", ["engine.kv_budget_tokens=40"])])
def test_plan_and_submit_report_the_same_budget_and_peak(tmp_path, tiny_model_dir, reviews_parquet, device,
                                                         overrides):
    job = _job(tmp_path, tiny_model_dir, reviews_parquet, device)
    report = api.plan(job, overrides)
    result = api.submit(job, overrides)
    assert result.rows_error == report.rows_error == 1 and result.output_tokens == report.max_output_tokens
    assert result.kv_budget_tokens == report.kv_budget_tokens and result.kv_budget_tokens % 4 == 0
    assert result.kv_peak_tokens == report.projected_kv_peak > 0
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["kv"] == {"budget_tokens": report.kv_budget_tokens, "peak_tokens": report.projected_kv_peak}
    if overrides:  # 40 tokens of KV: the rows must take turns
        assert report.kv_budget_tokens == 40 and report.projected_kv_peak <= 40
    else:  # the tiny model's budget is all the rows could ever use: prompt + max_tokens + 2 blocks each
        lengths = duckdb.sql(f"SELECT prompt_tokens, budget FROM '{tmp_path}/out/*.parquet' "
                             "WHERE error IS NULL").fetchall()
        assert report.kv_budget_tokens == -(-sum(n + m + 8 for n, m in lengths) // 4) * 4


def test_reference_engine_reports_no_kv(tmp_path, tiny_model_dir, reviews_parquet):
    result = api.submit(_job(tmp_path, tiny_model_dir, reviews_parquet), ["engine.backend=reference"])
    assert (result.status, result.kv_budget_tokens, result.kv_peak_tokens) == ("ok", None, None)


def test_prepare_sorts_rows_into_requests_and_errors_as_the_job_emits_them(tmp_path, tiny_model_dir):
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12, 13, 14], "text": ["short", None, "word " * 600, "done", "fine"],
                             "budget": pa.array([3, 2, 2, 2, None], type=pa.int32())}), data)
    job = _job(tmp_path, tiny_model_dir, data)
    spec = load_spec(job)
    tok = loader.load_tokenizer(spec.model)
    prepared = prepare(spec, tok, 512, done={13})
    assert prepared.ids == [10, 11, 12, 13, 14] and prepared.columns == ["text", "budget"]
    assert [r.key for r in prepared.requests] == [0] and prepared.requests[0].max_tokens == 3
    assert [row for row, _ in prepared.errors] == [1, 2, 4]  # 13 was committed earlier: skipped
    messages = dict(prepared.errors)
    assert messages[1] == "column 'text' is null"
    assert messages[2].startswith("prompt has ") and messages[2].endswith("tokens; the model's context is 512")
    assert messages[4] == "max_tokens column 'budget' is null; it must be >= 1"
    assert prepared.plan.num_rows == 1 and set(prepared.timings) == {"read_s", "tokenize_s", "plan_s"}

    result = api.submit(job)  # a fresh run emits every row: the same errors, row for row
    assert (result.rows_ok, result.rows_error) == (2, 3)
    got = dict(duckdb.sql(f"SELECT id, error FROM '{tmp_path}/out/*.parquet' WHERE error IS NOT NULL").fetchall())
    assert got == {prepared.ids[row]: message for row, message in prepared.errors}


def test_context_caps_max_tokens_of_a_prompt_that_fits(tmp_path, tiny_model_dir):
    data = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["word " * 250], "budget": pa.array([400], type=pa.int32())}), data)
    spec = load_spec(_job(tmp_path, tiny_model_dir, data))
    prepared = prepare(spec, loader.load_tokenizer(spec.model), 512)
    (req,) = prepared.requests
    assert len(req.prompt_ids) + req.max_tokens == 512 and not prepared.errors


def _facts(device: str, pending: int = 0) -> ModelFacts:
    return ModelFacts(max_context=512, device=device, dtype="bfloat16", kv_bytes_per_token=1000,
                      pending_weight_bytes=pending)


def test_budget_rule_explicit_cpu_cap_and_request_cap():
    reqs = [Request(key=i, prompt_ids=[1] * 10, max_tokens=5) for i in range(3)]
    e = EngineSpec(block_size=4)
    assert factory.kv_budget(e, _facts("cpu"), reqs) == 72  # 3 * (10 + 5 + 2 * 4) = 69, whole blocks
    assert factory.kv_budget(e.model_copy(update={"kv_budget_tokens": 30}), _facts("cpu"), reqs) == 28
    assert factory.kv_budget(e.model_copy(update={"kv_budget_tokens": 2}), _facts("cpu"), reqs) == 4
    assert factory.kv_budget(e, _facts("cpu"), []) == 4  # at least one block
    # CPU: a quarter of the memory, at most 2 GiB of KV
    assert factory.auto_kv_budget(_facts("cpu")) <= (2 << 30) // 1000


def test_an_explicit_budget_larger_than_the_device_is_a_spec_error():
    reqs = [Request(key=0, prompt_ids=[1] * 10, max_tokens=10**9)]  # (so the request cap does not bite)
    ram = factory.device_room(_facts("cpu"))
    e = EngineSpec(block_size=4, kv_budget_tokens=2 * ram // 1000)
    with pytest.raises(SpecError, match=r"engine.kv_budget_tokens: .* tokens of KV need .* GiB on cpu") as err:
        factory.kv_budget(e, _facts("cpu"), reqs)
    assert err.value.exit_code == 78


def test_a_huge_budget_is_planned_without_materializing_the_pool():
    """The simulator's allocator hands out blocks lazily: a budget of 10^12 tokens costs nothing."""
    import numpy as np

    from batchrun.engine.simulate import simulate
    from batchrun.plan.plan import PlanConfig, build_plan
    from batchrun.tokens import TokenTable

    plan = build_plan(TokenTable.from_lists([[1, 2, 3], [1, 2, 4]]), np.array([3, 2]), PlanConfig(block_size=4))
    res = simulate(plan, 10**12)
    assert (res.rows_done, res.rows_too_big, res.peak_kv_tokens) == (2, [], 8)


def test_cuda_budget_subtracts_the_weights_not_yet_loaded(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000_000, 20_000_000))
    assert factory.auto_kv_budget(_facts("cuda")) == 9_000  # submit: weights loaded, 90% of the free memory
    assert factory.auto_kv_budget(_facts("cuda", pending=4_000_000)) == 5_400  # plan: 90% of (free - weights)


def test_weight_estimate_equals_the_loaded_weights(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    loaded = loader.load(ModelSpec(path=tiny_model_dir), EngineSpec(device="cpu"))
    model = loaded.model
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert loader.estimate_weight_bytes(config, "float32") == real
    assert loader.estimate_weight_bytes(config, "bfloat16") < real
    facts = loader.model_facts(ModelSpec(path=tiny_model_dir), EngineSpec(device="cpu"), count_weights=True)
    assert (facts.dtype, facts.pending_weight_bytes) == ("float32", 0)  # on CPU the budget ignores weights
    assert facts == loader.loaded_facts(loaded)
