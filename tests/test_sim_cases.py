"""The engine's scheduler run on paper (batchrun.engine.simulate): hand-made runs with exact results, former
bugs pinned as normal tests, and the Past-Future budget arithmetic. Random-job properties: test_plan_sim.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plan import build
from test_plan_sim import least, sim, stream  # noqa: F401

from batchrun.plan.budget import blocks, fits, projected_peak
from batchrun.plan.order import OutputEstimator
from batchrun.plan.pack import PREFIX, ROW
from batchrun.plan.plan import PlanConfig


# ------------------------------------------------------------------------------ hand-made runs
def test_sim_exact_two_rows():
    plan = build([[1] * 10, [2] * 5], [3, 2], PlanConfig(step_tokens=64, block_size=1))
    assert [p.tolist() for p in plan.packs()] == [[[0, 1, 0, 5], [0, 0, 0, 10]]]
    res = sim(plan, 1000)
    # step 1: both prefills (15 KV), first tokens; step 2: both decode (11 + 6 = 17), row 1 ends; step 3: row 0
    assert res.to_dict() == dict(steps=3, prefill_tokens=15, decode_tokens=2 + 1, peak_kv_tokens=17,
                                 preemptions=0, rows_done=2, rows_too_big=[])


def test_sim_exact_rows_too_big():
    rows = [[1] * 10, [2] * 30, [3] * 4, [4] * 20]
    plan = build(rows, [5, 2, 20, 1], PlanConfig(step_tokens=64, block_size=4))
    assert plan.order.tolist() == [2, 0, 1, 3]
    assert least(plan) == [12 + 5 + 3, 32 + 2 + 3, 4 + 20 + 3, 20 + 1 + 3]  # 20, 37, 27, 24
    res = sim(plan, 26)  # a pool of 6 blocks: 24 tokens
    # step 1: row 2 fails, row 0 runs alone (row 1 waits: 20 + 37 > 24); 4 decodes (2-5, KV rk(10 + 4) = 16);
    # step 6: row 1 fails, row 3 runs alone (20 KV; its one token comes from its prefill)
    assert res.to_dict() == dict(steps=6, prefill_tokens=10 + 20, decode_tokens=4 + 0, peak_kv_tokens=20,
                                 preemptions=0, rows_done=2, rows_too_big=[1, 2])


def test_sim_too_big_shared_prefix_fails_its_members():
    """A shared prefix that does not fit while nothing runs: all its members fail, other rows still run."""
    p = list(range(100, 140))
    rows = [p + [1], p + [2], [3] * 10]
    plan = build(rows, [20, 20, 4], PlanConfig(step_tokens=64, block_size=1, overhead_tokens=0))
    assert plan.prefixes.end.tolist() == [40] and plan.order.tolist() == [0, 1, 2]
    res = sim(plan, 30)  # step 1: the prefix (40) fails, so do rows 0 and 1; row 2: prefill, 3 decodes (2-4)
    assert res.to_dict() == dict(steps=4, prefill_tokens=10, decode_tokens=3, peak_kv_tokens=13, preemptions=0,
                                 rows_done=1, rows_too_big=[0, 1])


def test_sim_prefix_started_ahead_of_a_row_is_evicted_for_it():
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
    assert sim(plan, 18).to_dict() == dict(steps=13, prefill_tokens=8 + 1 + 8 + 5 + 5, decode_tokens=9,
                                           peak_kv_tokens=13, preemptions=0, rows_done=3, rows_too_big=[])
    assert sim(plan, 10).to_dict()["rows_too_big"] == [0, 1, 2]  # 14, 14 and 11 > 10
    # step 1: the prefix, rows 2 and 0 (8 + 1 + 5); step 2: row 2 decodes, row 1 (8 + 2 + 5); then row 2 alone
    assert sim(plan, 19).to_dict() == dict(steps=10, prefill_tokens=19, decode_tokens=9, peak_kv_tokens=15,
                                           preemptions=0, rows_done=3, rows_too_big=[])


def test_sim_preempts_when_the_initial_estimate_is_small():
    """initial_estimate=0.2 admits three 10-token rows as if each made 1 of its 5 tokens (3 * 11 <= 40).
    Steps 2-4: each decodes (KV 33, 36, 39); step 5: row 0 decodes (40), row 1 finds the pool full, so the
    newest row, 2, is preempted (its 13 KV tokens freed), rows 0 and 1 end; step 6: row 2 is recomputed from
    its prompt and 4 tokens (one prefill of 14 instead of a decode) and samples its 5th token."""
    plan = build([[i] * 10 for i in range(3)], [5] * 3, PlanConfig(step_tokens=64, block_size=1))
    assert plan.order.tolist() == [0, 1, 2]
    res = sim(plan, 40, initial_estimate=0.2)
    assert res.to_dict() == dict(steps=6, prefill_tokens=30 + 14, decode_tokens=4 + 4 + 3, peak_kv_tokens=39,
                                 preemptions=1, rows_done=3, rows_too_big=[])
    # with the default estimate (max_tokens) only 2 rows are admitted at a time (2 * 15 <= 40 < 3 * 15)
    assert sim(plan, 40).to_dict() == dict(steps=10, prefill_tokens=30, decode_tokens=12, peak_kv_tokens=28,
                                           preemptions=0, rows_done=3, rows_too_big=[])


def test_sim_preempts_when_estimates_fall_short():
    """32 rows that stop after 1 of 20 tokens teach the estimator 5%; the next rows then run to 20 tokens."""
    rows = [[i] * 10 for i in range(48)]
    plan = build(rows, [20] * 48, PlanConfig(step_tokens=64, block_size=1))
    assert plan.order.tolist() == list(range(48))
    outputs = np.array([1] * 32 + [20] * 16)
    for budget in (31, 60, 200):
        res = sim(plan, budget, outputs)
        assert res.rows_done == 48 and res.rows_too_big == [] and res.preemptions > 0
        assert res.decode_tokens + res.preemptions == 32 * 1 + 16 * 19
        assert res.prefill_tokens - plan.prefill_tokens() >= 11 * res.preemptions and plan.prefill_tokens() == 480
        assert res.peak_kv_tokens <= budget


# ------------------------------------------------------------------------------ former simulator bugs
def test_chunked_rows_do_not_deadlock():
    """Was a hang: a chunked row waited for its next chunk behind a row that could not be admitted yet."""
    plan = build([[1] * 21, [2] * 30], [10, 5], PlanConfig(step_tokens=22, block_size=1, window_packs=1))
    assert [p.tolist() for p in plan.packs()] == [[[0, 1, 0, 22]], [[0, 0, 0, 21]], [[0, 1, 22, 30]]]
    res = sim(plan, 40, seconds=2.0)  # each row fits alone (21 + 10, 30 + 5), not both at once
    # row 1: prefill 22 + 8 (steps 1-2), 4 decodes (3-6, KV 30 + 4); then row 0: prefill (7), 9 decodes (8-16)
    assert res.to_dict() == dict(steps=16, prefill_tokens=51, decode_tokens=4 + 9, peak_kv_tokens=34,
                                 preemptions=0, rows_done=2, rows_too_big=[])


def test_rows_too_big_release_their_prefix():
    p = list(range(100, 120))
    rows = [p + [1], p + [2], [3] * 30]
    plan = build(rows, [100, 10, 5], PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0, window_packs=1))
    assert plan.order.tolist() == [0, 1, 2] and plan.prefixes.end.tolist() == [20]
    res = sim(plan, 40)  # row 0 needs 20 + 1 + 100; row 1 20 + 1 + 10; row 2 alone 30 + 5
    # step 1: the prefix, row 0 fails, row 1's token; 9 decodes (2-10, KV 20 + 10); the prefix is freed with
    # row 1, so row 2 runs: prefill 22 + 8 (11-12), 4 decodes (13-16, KV 34)
    assert res.to_dict() == dict(steps=17, prefill_tokens=20 + 1 + 30, decode_tokens=9 + 4, peak_kv_tokens=34,
                                 preemptions=0, rows_done=2, rows_too_big=[0])


def test_chunked_prefix_counts_whole_prefix():
    p = list(range(100, 130))
    plan = build([p + [1], p + [2]], [5, 5], PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0))
    assert [x.tolist() for x in plan.packs()] == [[[1, 0, 0, 22]], [[1, 0, 22, 30]], [[0, 0, 30, 31], [0, 1, 30, 31]]]
    res = sim(plan, 10**6)
    # the prefix in steps 1-2, both rows' tokens in step 2, 4 decodes each (3-6): 30 + 2 * (1 + 4) in step 6
    assert res.to_dict() == dict(steps=6, prefill_tokens=32, decode_tokens=8, peak_kv_tokens=30 + 2 * (1 + 4),
                                 preemptions=0, rows_done=2, rows_too_big=[])


def test_peak_counts_rows_in_their_last_step():
    plan = build([[1] * 10], [1], PlanConfig(block_size=1))
    assert sim(plan, 1000).to_dict() == dict(steps=1, prefill_tokens=10, decode_tokens=0, peak_kv_tokens=10,
                                             preemptions=0, rows_done=1, rows_too_big=[])


# ------------------------------------------------------------------------------ scheduler edge cases (were bugs)
def test_preemption_when_the_others_are_prefilling():
    plan = build([[1] * 4, [2] * 4, [3] * 2], [10, 2, 4],
                 PlanConfig(step_tokens=2, block_size=1, overhead_tokens=0, window_packs=1))
    assert least(plan) == [14, 6, 6] and plan.order.tolist() == [0, 2, 1]
    res = sim(plan, 15, initial_estimate=0.5)  # each row fits alone
    assert (res.rows_done, res.rows_too_big) == (3, []) and res.peak_kv_tokens <= 15
    # A preempted decoding row loses one decode to prefill; a preempted prefilling row loses none.
    assert res.preemptions >= 1 and 13 - res.preemptions <= res.decode_tokens <= 13


def test_no_empty_step_after_the_last_chunk():
    plan = build([[1] * 44], [1], PlanConfig(step_tokens=22, block_size=1, window_packs=1))
    assert [p.tolist() for p in plan.packs()] == [[[0, 0, 0, 22]], [[0, 0, 22, 44]]]
    assert sim(plan, 1000).to_dict() == dict(steps=2, prefill_tokens=44, decode_tokens=0, peak_kv_tokens=44,
                                             preemptions=0, rows_done=1, rows_too_big=[])


def test_nested_prefix_of_a_failed_prefix():
    P, Q = list(range(100, 140)), list(range(200, 230))
    rows = [P + Q + [i] for i in range(3)] + [P + [9, 8, 7], P + [9, 8, 6], [5] * 10]
    plan = build(rows, [1] * 6, PlanConfig(step_tokens=100, block_size=1, overhead_tokens=0))
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.parent.tolist()) == ([0, 40, 40], [40, 42, 70], [-1, 0, 0])
    res = sim(plan, 35)  # P (40) never fits; Q (30) and row 5 (10 + 1) would
    assert (res.rows_too_big, res.rows_done, res.prefill_tokens, res.decode_tokens) == ([0, 1, 2, 3, 4], 1, 10, 0)


def test_row_outgrowing_the_pool_alone():
    plan = build([[1] * 10], [20], PlanConfig(step_tokens=64, block_size=1))
    res = sim(plan, 15, initial_estimate=0.05)  # admitted as 10 + 1 tokens; needs 10 + 19
    assert res.rows_done + len(res.rows_too_big) == 1 and res.peak_kv_tokens <= 15


def test_prefix_freed_in_the_step_it_is_computed():
    p = list(range(100, 120))
    plan = build([p + [1], p + [2], [3] * 10], [100, 100, 5],
                 PlanConfig(step_tokens=22, block_size=1, overhead_tokens=0, window_packs=1))
    assert [x.tolist() for x in plan.packs()] == [[[1, 0, 0, 20]], [[0, 0, 20, 21], [0, 1, 20, 21]],
                                                  [[0, 2, 0, 10]]]
    res = sim(plan, 40)  # rows 0 and 1 need 20 + 1 + 100 each: too big; row 2 fits
    assert (res.rows_too_big, res.rows_done) == ([0, 1], 1)
    # either the prefix is not computed for nothing, or its KV counts
    assert res.prefill_tokens == 10 or res.peak_kv_tokens >= 20


def test_budget_under_one_block():
    plan = build([[7, 7, 7, i] for i in range(3)], [1] * 3, PlanConfig(step_tokens=2, block_size=4, overhead_tokens=0))
    assert plan.prefixes.end.tolist() == [3]
    res = sim(plan, 3)
    assert (res.rows_too_big, res.rows_done) == ([0, 1, 2], 0) and res.peak_kv_tokens <= 3


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
