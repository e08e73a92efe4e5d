"""The garbage collector during engine runs (``engine.collector``): the objects alive before a run are frozen
while runs go on and put back when the last one ends (any the process froze itself too);
``BATCHRUN_GC_FREEZE`` chooses. The tokens are the same either way."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from batchrun.engine.batch import BatchEngine
from batchrun.engine.requests import Request, SamplingParams
from batchrun.errors import RuntimeFailure
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.tokens import TokenTable


def _run(loaded, n: int = 3):
    """An engine run over ``n`` short requests, as a generator of its steps' completions (not started)."""
    reqs = [Request(key=i, prompt_ids=[5 + i, 17, 29 + i], max_tokens=6) for i in range(n)]
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    return BatchEngine(loaded, SamplingParams(ignore_eos=True), 10_000, 4, 64).run(reqs, plan)


def _tokens(run) -> dict:
    return {c.key: c.token_ids for batch in run for c in batch}


@pytest.fixture
def thawed():
    """No object frozen before or after the test (whatever it leaves)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_before_a_run_are_frozen_until_it_ends(tiny_fp32, monkeypatch, thawed):
    monkeypatch.delenv("BATCHRUN_GC_FREEZE", raising=False)
    run = _run(tiny_fp32)
    assert gc.get_freeze_count() == 0
    first = next(run)
    assert gc.get_freeze_count() > 1000  # (the model, the tokenizer, the libraries: out of full collections)
    got = {c.key: c.token_ids for c in first} | _tokens(run)
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv("BATCHRUN_GC_FREEZE", "0")
    run = _run(tiny_fp32)
    plain = {c.key: c.token_ids for c in next(run)}
    assert gc.get_freeze_count() == 0
    assert got == plain | _tokens(run)
    assert all(len(t) == 6 for t in got.values())


def test_overlapping_runs_put_the_objects_back_when_the_last_ends(tiny_fp32, monkeypatch, thawed):
    monkeypatch.delenv("BATCHRUN_GC_FREEZE", raising=False)
    first, second = _run(tiny_fp32), _run(tiny_fp32)
    next(first)
    next(second)
    _tokens(first)
    assert gc.get_freeze_count() > 0  # (the second run goes on)
    _tokens(second)
    assert gc.get_freeze_count() == 0
    stopped = _run(tiny_fp32)  # (a run its caller stops early puts them back too)
    next(stopped)
    stopped.close()
    assert gc.get_freeze_count() == 0


def test_objects_a_process_froze_itself_are_put_back_too(tiny_fp32, monkeypatch, thawed):
    """Python cannot put back only the objects a run froze: when the last run ends, every frozen object is put
    back (leaving them frozen would keep any garbage cycle alive at a run's start for good)."""
    monkeypatch.delenv("BATCHRUN_GC_FREEZE", raising=False)
    gc.freeze()
    mine = gc.get_freeze_count()
    run = _run(tiny_fp32)
    next(run)
    assert gc.get_freeze_count() > mine  # (what was made since: the run's engine, its requests)
    _tokens(run)
    assert gc.get_freeze_count() == 0


def test_a_bad_setting_is_a_clear_error(tiny_fp32, monkeypatch, thawed):
    monkeypatch.setenv("BATCHRUN_GC_FREEZE", "yes")
    with pytest.raises(RuntimeFailure, match=r"BATCHRUN_GC_FREEZE='yes': expected 1 .* or 0"):
        next(_run(tiny_fp32))
    assert gc.get_freeze_count() == 0
