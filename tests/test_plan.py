"""batchrun.plan: shared prefix groups, row order, prefix lifetimes and prefill packs, checked against brute
force on small random jobs (few base sequences + random tails over a tiny vocabulary, so sharing nests) and on
hand-made jobs with exact expected results. Random jobs come from plan_helpers.jobs. The simulator, budget and
estimator are tested in test_plan_sim.py and test_sim_cases.py."""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_helpers import Rows, build, chain, jobs

from batchrun.plan.pack import PREFIX, ROW, pack_window, packs
from batchrun.plan.plan import PlanConfig


def check_groups(rows: Rows, plan) -> None:
    g, n = plan.prefixes, len(rows)
    lengths = np.array([len(r) for r in rows])
    assert (g.row_start >= 0).all() and (g.row_start < lengths).all()
    chains = [chain(g, r) for r in range(n)]
    for p in range(len(g)):
        start, end, q = int(g.start[p]), int(g.end[p]), int(g.parent[p])
        members = [r for r in range(n) if p in chains[r]]
        assert g.members[p] == len(members) >= 2
        assert len({tuple(rows[r][:end]) for r in members}) == 1 and all(lengths[members] > end)
        assert q < p and start == (g.end[q] if q >= 0 else 0) and start < end
        depth = int(plan.trie.depth[g.node[p]])  # the node's depth, or one less where identical prompts end
        assert end == depth or (end == depth - 1 and sum(lengths[members] == depth) >= 2)
        assert (len(members) - 1) * (end - start) > plan.config.overhead_tokens  # the gain rule
        tokens = rows[members[0]][:end]
        for r in range(n):  # a row uses every shared prefix it extends (row_prefix is the innermost)
            assert (p in chains[r]) == (len(rows[r]) > end and rows[r][:end] == tokens), (p, r)
    own = int((lengths - g.row_start).sum())
    assert plan.prefill_tokens() == own + int((g.end - g.start).sum())
    assert plan.trie.unique_tokens <= plan.prefill_tokens() <= lengths.sum()


def expected_order(rows: Rows, est, trie_pos, group: list[int], depth: int) -> list[int]:
    """Brute-force DFS: rows ending here first, then child subtrees by their longest output, then by
    decode/prefill ratio, ties trie order."""
    out = sorted((r for r in group if len(rows[r]) == depth), key=lambda r: trie_pos[r])
    kids = defaultdict(list)
    for r in group:
        if len(rows[r]) > depth:
            kids[rows[r][depth]].append(r)
    keyed = []
    for kid in kids.values():
        lcp = depth + 1
        while all(len(rows[r]) > lcp and rows[r][lcp] == rows[kid[0]][lcp] for r in kid):
            lcp += 1
        uniq = len({tuple(rows[r][:k]) for r in kid for k in range(depth + 1, len(rows[r]) + 1)})
        ratio = Fraction(int(sum(est[r] for r in kid)), uniq)
        keyed.append((-max(est[r] for r in kid), -ratio, min(trie_pos[r] for r in kid), kid, lcp))
    for *_, kid, lcp in sorted(keyed, key=lambda k: k[:3]):
        out += expected_order(rows, est, trie_pos, kid, lcp)
    return out


def check_order(rows: Rows, plan) -> None:
    n, g = len(rows), plan.prefixes
    assert sorted(plan.order.tolist()) == list(range(n))
    assert np.array_equal(plan.position[plan.order], np.arange(n))
    trie_pos = np.empty(n, dtype=np.int64)
    trie_pos[plan.trie.order] = np.arange(n)
    assert plan.order.tolist() == expected_order(rows, plan.est_output, trie_pos, list(range(n)), 0)
    for p in range(len(g)):
        pos = sorted(plan.position[r] for r in range(n) if p in chain(g, r))
        assert pos == list(range(pos[0], pos[-1] + 1))  # members run together
        assert (plan.prefix_first[p], plan.prefix_last[p]) == (pos[0], pos[-1])


def check_packs(rows: Rows, plan) -> list:
    g, cap = plan.prefixes, plan.config.step_tokens
    all_packs = list(plan.packs())
    pieces = {ROW: defaultdict(list), PREFIX: defaultdict(list)}
    for i, pack in enumerate(all_packs):
        assert pack.dtype == np.int64 and pack.shape[1] == 4 and len(pack) >= 1
        assert (pack[:, 3] > pack[:, 2]).all() and (pack[:, 3] - pack[:, 2]).sum() <= cap
        for kind, ident, s, e in pack.tolist():
            pieces[kind][ident].append((i, s, e))
    assert set(pieces) == {ROW, PREFIX}
    assert sorted(pieces[ROW]) == list(range(len(rows))) and sorted(pieces[PREFIX]) == list(range(len(g)))

    def covered(ps, start, end):  # consecutive chunks in strictly increasing packs, exactly start..end
        assert [i for i, _, _ in ps] == sorted({i for i, _, _ in ps})
        assert [s for _, s, _ in ps] == [start] + [e for _, _, e in ps[:-1]] and ps[-1][2] == end

    for r, ps in pieces[ROW].items():
        covered(ps, int(g.row_start[r]), len(rows[r]))
        for p in chain(g, r):
            assert pieces[PREFIX][p][-1][0] < ps[0][0]
    for p, ps in pieces[PREFIX].items():
        covered(ps, int(g.start[p]), int(g.end[p]))
        if g.parent[p] >= 0:
            assert pieces[PREFIX][int(g.parent[p])][-1][0] < ps[0][0]
    return all_packs


@settings(max_examples=300, deadline=None)
@given(jobs(), st.data())
def test_plan_matches_brute_force(job, data):
    rows, max_tokens, config = job
    est = None
    if data.draw(st.booleans()):
        est = np.array(data.draw(st.lists(st.integers(1, 20), min_size=len(rows), max_size=len(rows))))
    plan = build(rows, max_tokens, config, est)
    assert np.array_equal(plan.est_output, max_tokens if est is None else np.minimum(est, max_tokens))
    check_groups(rows, plan)
    check_order(rows, plan)
    first = check_packs(rows, plan)
    again = build(rows, max_tokens, config, est)  # determinism
    for name in ("order", "position", "prefix_first", "prefix_last", "est_output"):
        assert np.array_equal(getattr(plan, name), getattr(again, name)), name
    for name in ("node", "parent", "start", "end", "members", "row_prefix"):
        assert np.array_equal(getattr(plan.prefixes, name), getattr(again.prefixes, name)), name
    second = list(again.packs())
    assert len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------ exact hand-made plans
def seq(base: int, k: int) -> list[int]:
    return list(range(base, base + k))


def test_system_documents_questions():
    s, d1, d2 = seq(1000, 40), seq(2000, 60), seq(3000, 50)
    rows = [s + d1 + [10] + [1] * 4, s + d1 + [11] + [1] * 5, s + d2 + [12] + [1] * 3, s + d1 + [12] + [2] * 6,
            s + d2 + [10] + [3] * 7]
    plan = build(rows, [10, 30, 5, 20, 200], PlanConfig(step_tokens=64))
    check_groups(rows, plan)
    check_order(rows, plan)
    check_packs(rows, plan)
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.parent.tolist()) == ([0, 40, 40], [40, 90, 100], [-1, 0, 0])
    assert g.members.tolist() == [5, 2, 3] and g.row_prefix.tolist() == [2, 2, 1, 2, 1]
    # document 2 (205 output / 62 prefill tokens) before document 1 (60 / 78); in each, by output / question
    assert plan.order.tolist() == [4, 2, 1, 3, 0]
    assert plan.prefix_first.tolist() == [0, 0, 2] and plan.prefix_last.tolist() == [4, 1, 4]
    assert plan.prefill_tokens() == plan.trie.unique_tokens == 180
    assert [p.tolist() for p in plan.packs()] == [
        [[PREFIX, 0, 0, 40]], [[PREFIX, 1, 40, 90]], [[ROW, 4, 90, 98]], [[ROW, 2, 90, 94], [PREFIX, 2, 40, 100]],
        [[ROW, 1, 100, 106], [ROW, 3, 100, 107], [ROW, 0, 100, 105]]]
    assert plan.stats()["prefix_levels"] == 2 and plan.stats()["packs"] == 5


def test_no_sharing_orders_longest_output_first_then_by_ratio():
    rows = [[5] * 10, [3] * 4, [9] * 2, [1] * 8]
    plan = build(rows, [20, 4, 10, 8], PlanConfig(overhead_tokens=0))
    assert len(plan.prefixes) == 0 and plan.prefixes.row_prefix.tolist() == [-1] * 4
    assert plan.order.tolist() == [0, 2, 3, 1]  # outputs 20, 10, 8, 4
    assert plan.prefill_tokens() == 24 and plan.prefix_first.tolist() == []
    same = build(rows, [10] * 4, PlanConfig(overhead_tokens=0))  # equal outputs: output / prefill decides
    assert same.order.tolist() == [2, 1, 3, 0]  # ratios 5, 2.5, 1.25, 1
    ratio = build(rows, [20, 4, 10, 8], PlanConfig(overhead_tokens=0, longest_first=False))  # BatchLLM's alone
    assert ratio.order.tolist() == [2, 0, 3, 1]  # ratios 5, 2, then 1 and 1 in trie order


def test_identical_prompts_share_all_but_their_last_token():
    """Identical prompts (n samples of a row) end at one trie node, which no row runs past; they share all of it
    but the last token, which each keeps as its own: 49 + 4 * 1 prefill tokens instead of 200. A longer prompt
    through the same node shares the same prefix; a lone prompt ending there keeps the node's full depth."""
    rows = [seq(100, 50)] * 4
    plan = build(rows, [2] * 4, PlanConfig(overhead_tokens=0))
    assert (plan.prefixes.start.tolist(), plan.prefixes.end.tolist()) == ([0], [49])
    assert plan.prefixes.row_start.tolist() == [49] * 4 and plan.prefixes.members.tolist() == [4]
    assert plan.order.tolist() == [0, 1, 2, 3] and plan.prefill_tokens() == 49 + 4 and plan.trie.unique_tokens == 50
    longer = build(rows + [seq(100, 60)], [2] * 5, PlanConfig(overhead_tokens=0))
    assert longer.prefixes.end.tolist() == [49] and longer.prefixes.row_start.tolist() == [49] * 5
    assert longer.prefill_tokens() == 49 + 4 + 11
    one = build([seq(100, 50), seq(100, 60), seq(100, 70)], [2] * 3, PlanConfig(overhead_tokens=0))
    assert one.prefixes.end.tolist() == [50] and one.prefill_tokens() == 50 + 50 + 10 + 20


def test_prompt_prefix_of_another():
    rows = [[1, 2, 3, 4], [1, 2], [1, 2, 9], [1]]
    plan = build(rows, [2] * 4, PlanConfig(overhead_tokens=0))
    check_groups(rows, plan)
    check_order(rows, plan)
    check_packs(rows, plan)
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.parent.tolist(), g.members.tolist()) == ([0, 1], [1, 2], [-1, 0],
                                                                                       [3, 2])
    assert g.row_prefix.tolist() == [1, 0, 1, -1]  # [1, 2] keeps its last token: it uses only [1]
    assert plan.order.tolist() == [3, 1, 2, 0]
    assert plan.prefix_first.tolist() == [1, 2] and plan.prefix_last.tolist() == [3, 3]
    assert (plan.prefill_tokens(), plan.trie.unique_tokens) == (7, 5)


def test_one_token_prompts():
    rows = [[7], [7], [8], [7]]
    plan = build(rows, [2, 2, 2, 2], PlanConfig(overhead_tokens=0))
    assert len(plan.prefixes) == 0 and plan.order.tolist() == [0, 1, 3, 2] and plan.prefill_tokens() == 4
    assert [p.tolist() for p in plan.packs()] == [[[ROW, 0, 0, 1], [ROW, 1, 0, 1], [ROW, 3, 0, 1], [ROW, 2, 0, 1]]]


@pytest.mark.parametrize("overhead, shared", [(16, False), (10, False), (9, True), (0, True)])
def test_overhead_decides_sharing(overhead, shared):
    rows = [seq(50, 5) + [i, 1, 2] for i in range(3)]  # 3 rows share 5 tokens: saving 2 * 5 = 10
    plan = build(rows, [1, 1, 1], PlanConfig(overhead_tokens=overhead))
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.members.tolist()) == (([0], [5], [3]) if shared else ([], [], []))
    assert plan.prefill_tokens() == (5 + 9 if shared else 24)


def test_small_system_prompt_folds_into_documents():
    s, d1, d2 = [1, 2, 3], seq(100, 30), seq(200, 30)
    rows = [s + d1 + [1], s + d1 + [2], s + d2 + [1], s + d2 + [2]]
    plan = build(rows, [1] * 4, PlanConfig(overhead_tokens=16))  # system: 3 * 3 = 9 <= 16, documents: 33 > 16
    g = plan.prefixes
    assert (g.start.tolist(), g.end.tolist(), g.parent.tolist(), g.members.tolist()) == ([0, 0], [33, 33],
                                                                                       [-1, -1], [2, 2])
    assert g.row_prefix.tolist() == [0, 0, 1, 1] and plan.prefill_tokens() == 33 * 2 + 4


def test_pack_window_chunks_long_rows():
    items = [(ROW, 0, 0, 25, -1), (ROW, 1, 0, 7, -1), (ROW, 2, 0, 3, -1)]
    got = [p.tolist() for p in pack_window(items, 10)]
    assert got == [[[ROW, 0, 0, 10]], [[ROW, 0, 10, 20]], [[ROW, 1, 0, 7], [ROW, 2, 0, 3]], [[ROW, 0, 20, 25]]]


def test_pack_window_best_fit_decreasing():
    items = [(ROW, i, 0, size, -1) for i, size in enumerate([3, 6, 2, 5, 4])]
    got = [p[:, 1].tolist() for p in pack_window(items, 10)]
    assert got == [[1, 4], [0, 2, 3]]  # 6 | 5; 4 fits the 6 exactly; 3 and 2 go with the 5


def test_pack_window_prefix_before_members():
    items = [(PREFIX, 0, 0, 12, -1), (ROW, 5, 12, 15, 0), (PREFIX, 1, 12, 14, 0), (ROW, 6, 14, 16, 1)]
    got = [p.tolist() for p in pack_window(items, 10)]
    assert got == [[[PREFIX, 0, 0, 10]], [[PREFIX, 0, 10, 12]], [[ROW, 5, 12, 15], [PREFIX, 1, 12, 14]],
                   [[ROW, 6, 14, 16]]]


def test_packs_windows_and_capacity():
    items = [(ROW, i, 0, 6, -1) for i in range(4)]
    assert [p[:, 1].tolist() for p in packs(iter(items), 10, window_packs=1)] == [[0], [1], [2], [3]]
    assert [p[:, 1].tolist() for p in packs(iter(items), 12, window_packs=8)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="capacity"):
        list(packs(iter(items), 0))
