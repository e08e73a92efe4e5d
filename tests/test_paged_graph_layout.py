"""The paged backend's static layouts (the buffers a CUDA graph replays from) give the oracle's tokens, for
decode graphs and for prefill graphs (long chunks, few narrow tiles), with every spare tile and spare token
of the fixed capacity launched; and the runner's choice of graph for each step. fp32: on the CPU through
Triton's interpreter (a CPU has no CUDA graphs: the layouts run eagerly here; the GPU tests replay them)."""

from __future__ import annotations

import os

import pytest
import torch
from test_engine import _oracle, _plan, _requests, _run

from batchrun.engine.batch import BatchEngine
from batchrun.engine.loader import load
from batchrun.engine.requests import SamplingParams
from batchrun.spec import EngineSpec, ModelSpec


@pytest.fixture(scope="module")
def paged_model(tiny_model_dir):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    if device == "cuda":  # (fp32 without TF32: the oracle and the engine must agree exactly)
        torch.backends.cuda.matmul.allow_tf32 = False
    return load(ModelSpec(path=tiny_model_dir, dtype="float32"), EngineSpec(device=device))


def test_static_layouts_give_the_oracles_tokens(paged_model, monkeypatch):
    """Every step laid out in the static buffers of the graph the runner would pick for it (prefill graphs'
    small narrow-tile capacity included), its inputs padded to that graph's tokens: the oracle's tokens."""
    monkeypatch.setenv("BATCHRUN_ATTENTION", "paged")
    monkeypatch.setenv("BATCHRUN_STEP_BUCKETS", "1")  # (the inputs padded to the buckets the graphs take)
    monkeypatch.setenv("BATCHRUN_CUDA_GRAPHS", "0")  # (on a GPU too: the runner's eager path, static layouts)
    reqs = _requests(paged_model.tokenizer)
    oracle = _oracle(paged_model, reqs)
    engine = BatchEngine(paged_model, SamplingParams(), kv_budget_tokens=100_000, block_size=16, step_tokens=64)
    runner, backend = engine.runner, engine.runner.backend
    kinds = []

    def static(step, tokens=None):
        key = runner._graph_key(step)
        assert key is not None and key[0] == (tokens or step.num_tokens), (key, tokens, step.num_tokens)
        prefill = key[1] == 0
        assert prefill == any(len(s.tokens) > 64 for s in step.seqs) or len(step.sample_index) == 0
        assert backend.prepare_graph(step, key[0], key[2], prefill=prefill)
        kinds.append(prefill)

    monkeypatch.setattr(backend, "prepare", static)
    got = _run(engine, reqs, _plan(reqs, 64, 16))
    for r in reqs:
        assert got[r.key].token_ids == oracle[r.key].token_ids, f"row {r.key}"
    assert True in kinds and False in kinds  # (both kinds of graph layout ran)


def test_prefill_graphs_can_be_turned_off_and_long_steps_stay_eager(paged_model, monkeypatch):
    """``BATCHRUN_PREFILL_GRAPHS=0``: prefill steps get no graph (decode steps still do); a step over
    ``PREFILL_GRAPH_TOKENS`` never does; a bad value is refused by name."""
    from batchrun.engine import runner as runner_mod
    from batchrun.errors import RuntimeFailure

    monkeypatch.setenv("BATCHRUN_ATTENTION", "paged")
    reqs = _requests(paged_model.tokenizer)
    keys = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("BATCHRUN_PREFILL_GRAPHS", setting)
        engine = BatchEngine(paged_model, SamplingParams(), kv_budget_tokens=100_000, block_size=16, step_tokens=64)
        runner = engine.runner
        seen = keys[setting] = []
        prepare = runner.backend.prepare
        monkeypatch.setattr(runner.backend, "prepare",
                            lambda step, tokens=None, r=runner, s=seen, p=prepare: s.append(r._graph_key(step)) or
                            p(step, tokens))
        _run(engine, reqs, _plan(reqs, 64, 16))
    assert any(k is not None and k[1] == 0 for k in keys["1"])  # prefill graphs
    assert all(k is None or k[1] > 0 for k in keys["0"]) and any(k is not None for k in keys["0"])
    monkeypatch.setattr(runner_mod, "PREFILL_GRAPH_TOKENS", 32)
    monkeypatch.setenv("BATCHRUN_PREFILL_GRAPHS", "1")
    engine = BatchEngine(paged_model, SamplingParams(), kv_budget_tokens=100_000, block_size=16, step_tokens=64)
    seen = []
    prepare = engine.runner.backend.prepare
    monkeypatch.setattr(engine.runner.backend, "prepare",
                        lambda step, tokens=None: seen.append((step.num_tokens, engine.runner._graph_key(step)))
                        or prepare(step, tokens))
    _run(engine, reqs, _plan(reqs, 64, 16))
    assert all(k is None for t, k in seen if t > 32 and (k is None or k[1] == 0))
    assert any(t > 32 and k is None for t, k in seen)
    monkeypatch.setenv("BATCHRUN_PREFILL_GRAPHS", "yes")
    with pytest.raises(RuntimeFailure, match="BATCHRUN_PREFILL_GRAPHS='yes': expected a whole number >= 0"):
        BatchEngine(paged_model, SamplingParams(), kv_budget_tokens=100_000, block_size=16, step_tokens=64)
