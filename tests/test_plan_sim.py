"""batchrun.engine.simulate (the engine's scheduler driven on paper) on small random jobs: invariants of the
simulated run that hold whatever the exact schedule (every row finishes or is reported too big, and a row is
too big exactly when it cannot fit alone; KV stays within the budget's whole blocks; prefill and decode token
counts add up; no preemption while the estimates hold; the KV peak lies between what one row needs at its
end and everything live at once). Random jobs come from plan_helpers.jobs; the simulator's conventions are
described in plan_helpers.py. Hand-made runs (a few exact golden runs, the former bugs): test_sim_cases.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_helpers import (
    at_once,
    build,
    check_run,
    decodes,
    draw_outputs,
    generous,
    jobs,
    least,
    lower_peak,
    needs,
    own,
    pool,
    prefix_kv,
    rk,
    sim,
)


@settings(max_examples=60, deadline=None)
@given(jobs(), st.integers(0, 50), st.data())
def test_sim_budget_for_everything(job, slack, data):
    """Nothing ever waits for KV: no preemption, nothing recomputed, the peak within everything-at-once, prefill
    as fast as the packs allow, and more KV than that changes nothing."""
    rows, max_tokens, config = job
    plan = build(rows, max_tokens, config)
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    budget = rk(generous(plan) + slack, config.block_size)
    res = sim(plan, budget, outputs)
    check_run(plan, budget, res, outputs)
    assert (res.rows_done, res.rows_too_big, res.preemptions) == (len(rows), [], 0)
    assert res.prefill_tokens == plan.prefill_tokens()
    assert res.decode_tokens == int(decodes(target, max_tokens).sum())
    assert lower_peak(plan, target) <= res.peak_kv_tokens <= min(at_once(plan, target), budget)
    # prefill never stalls: at worst one pack a step (packs hold <= step_tokens), then the longest decode
    prefill_steps = -(-plan.prefill_tokens() // config.step_tokens)
    n_packs = sum(1 for _ in plan.packs())
    assert max(prefill_steps, int(decodes(target, max_tokens).max()) + 1) <= res.steps
    assert res.steps <= n_packs + int(decodes(target, max_tokens).max()) + 1
    assert sim(plan, 2 * budget + 7, outputs) == res  # KV that nothing waits for changes nothing


@settings(max_examples=60, deadline=None)
@given(jobs(), st.integers(0, 50), st.data())
def test_sim_budget_for_the_biggest_row(job, slack, data):
    """Rows wait for each other, but every one fits alone: all finish, with exact token counts."""
    rows, max_tokens, config = job
    n, bs = len(rows), config.block_size
    est = data.draw(st.none() | st.lists(st.integers(1, 20), min_size=n, max_size=n).map(np.array))
    plan = build(rows, max_tokens, config, est)
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    budget = rk(max(needs(plan).values()), bs) + slack
    res = sim(plan, budget, outputs)
    check_run(plan, budget, res, outputs)
    # fewer than 32 rows: the estimate stays max_tokens, which never falls short, so nothing is preempted
    assert (res.rows_done, res.rows_too_big, res.preemptions) == (n, [], 0)
    assert res.prefill_tokens >= plan.prefill_tokens()  # a prefix evicted while its members wait is recomputed
    assert res.decode_tokens == int(decodes(target, max_tokens).sum())
    assert lower_peak(plan, target) <= res.peak_kv_tokens <= min(at_once(plan, target), pool(budget, bs))
    prefill_steps = -(-plan.prefill_tokens() // config.step_tokens)
    assert res.steps >= max(prefill_steps, int(decodes(target, max_tokens).max()) + 1)
    # a budget that fits everything never takes more steps, nor recomputes more, than a tighter one
    big = rk(generous(plan), bs)
    if big > budget:
        roomy = sim(plan, big, outputs)
        assert roomy.steps <= res.steps and roomy.prefill_tokens <= res.prefill_tokens


@settings(max_examples=60, deadline=None)
@given(jobs(), st.data())
def test_sim_small_budget_reports_rows_too_big(job, data):
    """Every prefix fits, not every row: the rows too big are exactly those whose ``least`` exceeds the pool."""
    rows, max_tokens, config = job
    plan = build(rows, max_tokens, config)
    bs, need = config.block_size, least(plan)
    prefixes = sum(prefix_kv(plan))
    budget = prefixes + data.draw(st.integers(0, max(max(need) + bs - prefixes, 0)))
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    res = sim(plan, budget, outputs)
    ok = check_run(plan, budget, res, outputs)
    too_big = [r for r in range(len(rows)) if need[r] > pool(budget, bs)]
    assert (res.rows_too_big, res.rows_done, res.preemptions) == (too_big, len(rows) - len(too_big), 0)
    # every prefix is computed (again, if evicted while its members waited), the rows that fit once
    assert res.prefill_tokens >= int(own(plan)[ok].sum() + plan.prefixes.tokens.sum())
    assert res.decode_tokens == int(decodes(target, max_tokens)[ok].sum())
    assert lower_peak(plan, target, ok) <= res.peak_kv_tokens <= budget


@settings(max_examples=60, deadline=None)
@given(jobs(n_rows=st.integers(33, 60), base_len=30), st.data())
def test_sim_learned_estimates_and_preemption(job, data):
    """With more than 32 rows the estimator learns from short outputs; rows that outrun it get preempted.
    A preempted row is recomputed from its prompt and the tokens it made: that prefill replaces one decode."""
    rows, max_tokens, config = job
    max_tokens = max_tokens + 10  # the first 32 rows make 1 token: a learned fraction <= 1/11
    plan = build(rows, max_tokens, config)
    budget = rk(max(needs(plan).values()), config.block_size) + data.draw(st.integers(0, 300))
    outputs = np.array([data.draw(st.integers(1, int(m)) if i >= 32 else st.just(1)) for i, m in
                        enumerate(max_tokens[plan.order])])[np.argsort(plan.order)]
    if data.draw(st.booleans()):  # rows after the first 32 run to max_tokens: beyond the learned estimate
        outputs = np.where(plan.position >= 32, max_tokens, outputs)
    res = sim(plan, budget, outputs)
    check_run(plan, budget, res, outputs)
    assert (res.rows_done, res.rows_too_big) == (len(rows), [])
    # each preemption of a decoding row turns one decode into prefill; of a prefilling row, none
    want = int(decodes(outputs, max_tokens).sum())
    assert want - res.preemptions <= res.decode_tokens <= want
    extra = res.prefill_tokens - plan.prefill_tokens()
    # recomputed rows (>= 1 own + 1 made token each); evicted prefixes may add more
    assert extra >= 2 * res.preemptions
    assert sim(plan, budget, outputs) == res  # deterministic


@settings(max_examples=80, deadline=None)
@given(jobs(), st.data())
def test_sim_any_budget(job, data):
    """Any budget at all (even under one block or under a shared prefix), any initial estimate: the run ends,
    the invariants of every run hold, and no row that fits alone is given up on. With an estimate below
    max_tokens a row that does not fit alone may still finish (its output is short), else those are exactly
    the rows too big."""
    rows, max_tokens, config = job
    plan = build(rows, max_tokens, config)
    budget = data.draw(st.integers(0, generous(plan) + 64))
    outputs = draw_outputs(data, max_tokens)
    initial = data.draw(st.sampled_from([0.05, 0.3, 1.0]))
    res = sim(plan, budget, outputs, initial_estimate=initial)
    check_run(plan, budget, res, outputs)
    need = least(plan)
    cannot = [r for r in range(len(rows)) if need[r] > pool(budget, config.block_size)]
    assert set(res.rows_too_big) <= set(cannot)
    if initial == 1.0:
        assert res.rows_too_big == cannot and res.preemptions == 0
