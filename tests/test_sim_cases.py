"""The engine's scheduler run on paper (batchrun.engine.simulate) on hand-made jobs: four golden runs with exact
results (each worked out by hand in a ``# golden:`` comment), then cases that pin behaviours and former bugs by
their invariants rather than by step counts, and the Past-Future budget arithmetic and output estimator.
Random-job properties: test_plan_sim.py; the simulator's conventions: plan_helpers.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_helpers import at_once, build, check_run, least, pool, prefix_kv, sim

from batchrun.plan.budget import blocks, fits, projected_peak
from batchrun.plan.order import OutputEstimator
from batchrun.plan.pack import PREFIX, ROW
from batchrun.plan.plan import PlanConfig


# ------------------------------------------------------------------------------ golden runs (exact results)
def test_golden_two_rows():
    plan = build([[1] * 10, [2] * 5], [3, 2], PlanConfig(step_tokens=64, block_size=1))
    assert [p.tolist() for p in plan.packs()] == [[[ROW, 0, 0, 10], [ROW, 1, 0, 5]]]  # (the longer output first)
    res = sim(plan, 1000)
    check_run(plan, 1000, res)
    # golden: step 1 prefills both rows (5 + 10 = 15 tokens <= 64, KV 15) and samples each row's first token;
    # step 2: both decode (KV 11 + 6 = 17, the peak), row 1 has its 2 tokens and ends; step 3: row 0 decodes
    # its 3rd token and ends. 15 prefill tokens, 2 + 1 decodes, 3 steps, nothing waits or is preempted.
    assert res.to_dict() == dict(steps=3, prefill_tokens=15, decode_tokens=2 + 1, peak_kv_tokens=17,
                                 preemptions=0, rows_done=2, rows_too_big=[])


def test_golden_rows_too_big_and_admission_in_plan_order():
    rows = [[1] * 10, [2] * 30, [3] * 4, [4] * 20]
    plan = build(rows, [5, 2, 20, 1], PlanConfig(step_tokens=64, block_size=4))
    assert plan.order.tolist() == [2, 0, 1, 3]
    # alone: block-rounded prompt + max_tokens + the projection's block slack (3)
    assert least(plan) == [12 + 5 + 3, 32 + 2 + 3, 4 + 20 + 3, 20 + 1 + 3]  # 20, 37, 27, 24
    res = sim(plan, 26)
    check_run(plan, 26, res)
    # golden: budget 26 is a pool of 6 blocks (24 tokens), so rows 1 (37) and 2 (27) are too big. Step 1: row 2
    # is tried alone and fails, row 0 is admitted (prefill 10, 3 blocks) and samples its 1st token; row 1, next
    # in plan order, waits (20 + 37 > 24) and holds back row 3 behind it. Steps 2-5: row 0's 4 decodes (KV
    # rk(10 + 4) = 16). Step 6: nothing runs, so row 1 is tried alone and fails; row 3 runs alone (prefill 20,
    # 5 blocks = 20, the peak) and its only token comes from that prefill.
    assert res.to_dict() == dict(steps=6, prefill_tokens=10 + 20, decode_tokens=4 + 0, peak_kv_tokens=20,
                                 preemptions=0, rows_done=2, rows_too_big=[1, 2])


def test_golden_prefix_started_ahead_of_a_row_is_evicted_for_it():
    """Row 2 runs first in plan order, but packing puts the prefix of rows 0 and 1 in an earlier pack: when
    row 2 is tried the prefix is live, and 8 + 1 + 10 = 19 does not fit 18. Nothing runs, so the idle prefix is
    evicted (after the step that wrote it), row 2 runs alone (11), and the prefix is recomputed for rows 0, 1."""
    P = [9] * 8
    plan = build([P + [1] * 5, P + [2] * 5, [5]], [1, 1, 10], PlanConfig(step_tokens=16, block_size=1,
                                                                          overhead_tokens=0))
    assert plan.order.tolist() == [2, 0, 1] and plan.prefixes.end.tolist() == [8]
    assert [p.tolist() for p in plan.packs()] == [[[PREFIX, 0, 0, 8]], [[ROW, 2, 0, 1], [ROW, 0, 8, 13],
                                                                         [ROW, 1, 8, 13]]]
    assert least(plan) == [14, 14, 11]
    res = sim(plan, 18)
    check_run(plan, 18, res)
    # golden: step 1 computes the prefix (8); row 2 waits (8 + 1 + 10 > 18). Step 2: nothing runs, the prefix
    # is evicted, row 2 prefills alone (1) and samples; steps 3-11: its 9 decodes (KV up to 10; the prefix
    # cannot come back beside it: 8 + 11 > 18). Step 12: the prefix again (8) and row 0 (5), KV 13, row 0's
    # only token; row 1 waits (8 + 6 + 6 > 18). Step 13: row 1 (5) on the prefix, KV 13. Prefill 8 + 1 + 8 + 5
    # + 5 = 27, 9 decodes, 13 steps.
    assert res.to_dict() == dict(steps=13, prefill_tokens=8 + 1 + 8 + 5 + 5, decode_tokens=9,
                                 peak_kv_tokens=13, preemptions=0, rows_done=3, rows_too_big=[])
    small = sim(plan, 10)
    check_run(plan, 10, small)
    assert small.rows_too_big == [0, 1, 2]  # 14, 14 and 11 > 10
    # with 19 the prefix and row 2 fit together: nothing is evicted, so nothing is computed twice
    roomy = sim(plan, 19)
    check_run(plan, 19, roomy)
    assert (roomy.rows_done, roomy.preemptions, roomy.prefill_tokens) == (3, 0, plan.prefill_tokens())
    assert roomy.steps < res.steps


def test_golden_preempts_when_the_initial_estimate_is_small():
    plan = build([[i] * 10 for i in range(3)], [5] * 3, PlanConfig(step_tokens=64, block_size=1))
    assert plan.order.tolist() == [0, 1, 2]
    res = sim(plan, 40, initial_estimate=0.2)
    check_run(plan, 40, res)
    # golden: initial_estimate=0.2 admits the three 10-token rows as if each made 1 of its 5 tokens
    # (3 * 11 <= 40); step 1 prefills all three (KV 30). Steps 2-4: each decodes (KV 33, 36, 39, the peak).
    # Step 5: row 0 decodes (40), row 1 finds the pool full, so the newest row, 2, is preempted (its 13 KV
    # tokens freed); rows 0 and 1 make their 5th token and end. Step 6: row 2 is recomputed from its prompt and
    # its 4 tokens (one prefill of 14 instead of a decode) and samples its 5th token. Decodes: 4 + 4 + 3.
    assert res.to_dict() == dict(steps=6, prefill_tokens=30 + 14, decode_tokens=4 + 4 + 3, peak_kv_tokens=39,
                                 preemptions=1, rows_done=3, rows_too_big=[])
    # with the default estimate (max_tokens) it never falls short, so nothing is preempted, and admission keeps
    # the projected peak within 40: at most 2 rows at once (2 * 15 <= 40 < 3 * 15), each at most 10 + 4 KV
    default = sim(plan, 40)
    check_run(plan, 40, default)
    assert (default.rows_done, default.preemptions, default.prefill_tokens, default.decode_tokens) == (3, 0, 30, 12)
    assert default.peak_kv_tokens <= 2 * (10 + 4) and default.steps > res.steps


# ------------------------------------------------------------------------------ hand-made runs, by invariant
def test_sim_too_big_shared_prefix_fails_its_members():
    """A shared prefix that does not fit while nothing runs: all its members fail, other rows still run, and
    the prefix is never computed (it cannot be: 40 > 30)."""
    p = list(range(100, 140))
    rows = [p + [1], p + [2], [3] * 10]
    plan = build(rows, [20, 20, 4], PlanConfig(step_tokens=64, block_size=1, overhead_tokens=0))
    assert plan.prefixes.end.tolist() == [40] and plan.order.tolist() == [0, 1, 2]
    res = sim(plan, 30)
    check_run(plan, 30, res)
    assert (res.rows_too_big, res.rows_done, res.preemptions) == ([0, 1], 1, 0)
    assert (res.prefill_tokens, res.decode_tokens) == (10, 3)  # row 2 only: its prompt, then 3 decodes


def test_sim_preempts_when_estimates_fall_short():
    """32 rows that stop after 1 of 20 tokens teach the estimator 5%; the next rows then run to 20 tokens."""
    rows = [[i] * 10 for i in range(48)]
    plan = build(rows, [20] * 48, PlanConfig(step_tokens=64, block_size=1))
    assert plan.order.tolist() == list(range(48))
    outputs = np.array([1] * 32 + [20] * 16)
    for budget in (31, 60, 200):
        res = sim(plan, budget, outputs)
        check_run(plan, budget, res, outputs)
        assert res.rows_done == 48 and res.rows_too_big == [] and res.preemptions > 0
        assert res.decode_tokens + res.preemptions == 32 * 1 + 16 * 19
        assert res.prefill_tokens - plan.prefill_tokens() >= 11 * res.preemptions and plan.prefill_tokens() == 480


# ------------------------------------------------------------------------------ former simulator bugs
def test_chunked_rows_do_not_deadlock():
    """Was a hang: a chunked row waited for its next chunk behind a row that could not be admitted yet."""
    plan = build([[1] * 21, [2] * 30], [10, 5], PlanConfig(step_tokens=22, block_size=1, window_packs=1))
    assert [p.tolist() for p in plan.packs()] == [[[ROW, 1, 0, 22]], [[ROW, 0, 0, 21]], [[ROW, 1, 22, 30]]]
    assert least(plan) == [21 + 10, 30 + 5] and sum(least(plan)) > 40  # each row fits alone, not both at once
    res = sim(plan, 40, seconds=2.0)
    check_run(plan, 40, res)
    assert (res.rows_done, res.rows_too_big, res.preemptions) == (2, [], 0)
    assert (res.prefill_tokens, res.decode_tokens) == (21 + 30, 9 + 4)


def test_rows_too_big_release_their_prefix():
    """Was: a row failing as too big kept its shared prefix, so later rows could never fit beside it."""
    p = list(range(100, 120))
    rows = [p + [1], p + [2], [3] * 30]
    plan = build(rows, [100, 10, 5], PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0, window_packs=1))
    assert plan.order.tolist() == [0, 1, 2] and plan.prefixes.end.tolist() == [20]
    assert least(plan) == [20 + 1 + 100, 20 + 1 + 10, 30 + 5]
    res = sim(plan, 40)
    check_run(plan, 40, res)
    assert (res.rows_too_big, res.rows_done, res.preemptions) == ([0], 2, 0)
    # row 2 (35) ran, so the prefix (20) was let go once its last member ended: 20 + 35 > 40
    assert (res.prefill_tokens, res.decode_tokens) == (20 + 1 + 30, 9 + 4)


def test_chunked_prefix_counts_whole_prefix():
    """Was: the KV peak counted only the last chunk of a prefix computed over two steps."""
    p = list(range(100, 130))
    plan = build([p + [1], p + [2]], [5, 5], PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0))
    assert [x.tolist() for x in plan.packs()] == [[[PREFIX, 0, 0, 22]], [[PREFIX, 0, 22, 30]],
                                                  [[ROW, 0, 30, 31], [ROW, 1, 30, 31]]]
    res = sim(plan, 10**6)
    check_run(plan, 10**6, res)
    assert (res.rows_done, res.preemptions, res.prefill_tokens, res.decode_tokens) == (2, 0, 32, 8)
    # nothing waits, so both members decode side by side on the whole prefix: 30 + 2 * (1 + 4)
    assert res.peak_kv_tokens == at_once(plan, plan.max_tokens) == 40


def test_peak_counts_rows_in_their_last_step():
    """Was: a row finishing in a step was not counted in that step's KV."""
    plan = build([[1] * 10], [1], PlanConfig(block_size=1))
    res = sim(plan, 1000)
    check_run(plan, 1000, res)
    # its only token comes from its prefill, in the one step it holds its 10 KV tokens
    assert (res.rows_done, res.steps, res.peak_kv_tokens) == (1, 1, 10)


# ------------------------------------------------------------------------------ scheduler edge cases (were bugs)
def test_preemption_when_the_others_are_prefilling():
    plan = build([[1] * 4, [2] * 4, [3] * 2], [10, 2, 4],
                 PlanConfig(step_tokens=2, block_size=1, overhead_tokens=0, window_packs=1))
    assert least(plan) == [14, 6, 6] and plan.order.tolist() == [0, 2, 1]
    res = sim(plan, 15, initial_estimate=0.5)  # each row fits alone
    check_run(plan, 15, res)
    assert (res.rows_done, res.rows_too_big) == (3, [])
    # A preempted decoding row loses one decode to prefill; a preempted prefilling row loses none.
    assert res.preemptions >= 1 and 13 - res.preemptions <= res.decode_tokens <= 13


def test_no_empty_step_after_the_last_chunk():
    """Was: a run ended with an extra step that had no work. A prefill-only run takes exactly as many steps as
    its prefill needs at step_tokens a step."""
    plan = build([[1] * 44], [1], PlanConfig(step_tokens=22, block_size=1, window_packs=1))
    assert [p.tolist() for p in plan.packs()] == [[[ROW, 0, 0, 22]], [[ROW, 0, 22, 44]]]
    res = sim(plan, 1000)
    check_run(plan, 1000, res)
    assert (res.rows_done, res.prefill_tokens, res.decode_tokens) == (1, 44, 0)
    assert res.steps == -(-44 // 22)


def test_nested_prefix_of_a_failed_prefix():
    P, Q = list(range(100, 140)), list(range(200, 230))
    rows = [P + Q + [i] for i in range(3)] + [P + [9, 8, 7], P + [9, 8, 6], [5] * 10]
    plan = build(rows, [1] * 6, PlanConfig(step_tokens=100, block_size=1, overhead_tokens=0))
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.parent.tolist()) == ([0, 40, 40], [40, 42, 70], [-1, 0, 0])
    res = sim(plan, 35, seconds=2.0)  # P (40) never fits; Q (30) and row 5 (10 + 1) would
    check_run(plan, 35, res)
    assert res.rows_too_big == [r for r in range(6) if least(plan)[r] > 35] == [0, 1, 2, 3, 4]
    # neither P nor the prefixes inside it are computed: only row 5's prompt; its one token needs no decode
    assert (res.rows_done, res.prefill_tokens, res.decode_tokens) == (1, 10, 0)


def test_row_outgrowing_the_pool_alone():
    plan = build([[1] * 10], [20], PlanConfig(step_tokens=64, block_size=1))
    res = sim(plan, 15, initial_estimate=0.05, seconds=2.0)  # admitted as 10 + 1 tokens; needs 10 + 19
    check_run(plan, 15, res)
    assert res.rows_too_big == [0] and res.rows_done == 0


def test_prefix_freed_in_the_step_it_is_computed():
    p = list(range(100, 120))
    plan = build([p + [1], p + [2], [3] * 10], [100, 100, 5],
                 PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0, window_packs=1))
    assert [x.tolist() for x in plan.packs()] == [[[PREFIX, 0, 0, 20]], [[ROW, 0, 20, 21], [ROW, 1, 20, 21]],
                                                  [[ROW, 2, 0, 10]]]
    res = sim(plan, 40)  # rows 0 and 1 need 20 + 1 + 100 each: too big; row 2 fits
    check_run(plan, 40, res)
    assert (res.rows_too_big, res.rows_done) == ([0, 1], 1)
    # either the prefix is not computed for nothing, or its KV counts
    assert res.prefill_tokens == 10 or res.peak_kv_tokens >= 20


def test_budget_under_one_block():
    plan = build([[7, 7, 7, i] for i in range(3)], [1] * 3, PlanConfig(step_tokens=2, block_size=4, overhead_tokens=0))
    assert plan.prefixes.end.tolist() == [3] and prefix_kv(plan) == [4]
    res = sim(plan, 3, seconds=2.0)
    check_run(plan, 3, res)
    assert pool(3, 4) == 0 and (res.rows_too_big, res.rows_done, res.peak_kv_tokens) == ([0, 1, 2], 0, 0)


# ------------------------------------------------------------------------------ budget
def test_projected_peak_by_hand():
    cur, rem = np.array([10, 20, 5]), np.array([3, 8, 1])
    # by remaining: (20, 8), (10, 3), (5, 1) -> 20 + 1*8, 30 + 2*3, 35 + 3*1 -> 28, 36, 38
    assert projected_peak(cur, rem) == 38
    assert projected_peak(cur, rem, block_size=16) == 38 + 15 * 3
    assert projected_peak(np.array([100, 1]), np.array([1, 50])) == 103  # max(1 + 50, 101 + 2 * 1)
    assert projected_peak(np.zeros(0, np.int64), np.zeros(0, np.int64), 16) == 0
    assert fits(cur, rem, 5, 43) and not fits(cur, rem, 5, 42)
    assert fits(cur, rem, 0, 38 + 45, block_size=16) and not fits(cur, rem, 0, 38 + 44, block_size=16)
    assert blocks(17, 16) == 2 and blocks(np.array([0, 1, 16, 17, 32]), 16).tolist() == [0, 1, 1, 2, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=8))
def test_projected_peak_matches_stepping(rows):
    cur, rem = np.array(rows).T
    brute = max(sum(c + t for c, r in rows if r >= t) for t in set(rem.tolist()))
    assert projected_peak(cur, rem) == brute


# ------------------------------------------------------------------------------ output estimator
def test_output_estimator_percentile():
    est = OutputEstimator(np.array([100, 7, 1]), percentile=90.0, min_samples=32)
    assert est.fraction == 1.0 and est.estimate().tolist() == [100, 7, 1]
    for _ in range(31):
        est.observe(100, 25)
    assert est.estimate().tolist() == [100, 7, 1]  # fewer than min_samples: max_tokens
    est.observe(100, 25)
    assert est.fraction == 0.25 and est.estimate().tolist() == [25, 2, 1]
    assert est.estimate(np.array([1, 1])).tolist() == [2, 2]
    for _ in range(31):
        est.observe(4, 9)  # capped at max_tokens: fraction 1.0
    assert est.fraction == 0.25  # refreshed only at 64 samples
    est.observe(4, 4)
    assert est.fraction == 1.0  # 90th percentile of 32 x 0.25, 32 x 1.0


def test_output_estimator_interpolates():
    est = OutputEstimator(np.array([100, 7]), percentile=90.0, min_samples=32)
    for i in range(32):
        est.observe(32, i)  # fractions 0, 1/32, ..., 31/32
    assert est.fraction == pytest.approx(27.9 / 32)  # linear interpolation at rank 0.9 * 31
    assert est.estimate().tolist() == [88, 7]
