"""batchrun.plan.trie: the trie order, exact LCPs and the compressed trie, checked against brute force on
small random inputs (tiny vocabularies so sharing is frequent; lengths crossing the 32-token chunk) and on
hand-made inputs with an exact expected node structure."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.plan import trie as trie_mod
from batchrun.plan.trie import build_trie, trie_order
from batchrun.tokens import TokenTable

Rows = list[list[int]]


@st.composite
def prompt_rows(draw) -> Rows:
    """Rows cut from a few base sequences plus random tails: identical rows, prefixes, empty rows, shared
    prefixes ending anywhere (across chunk boundaries), over 1-4 symbols mapped to arbitrary token ids."""
    ids = draw(st.lists(st.sampled_from([0, 1, 2, 7, 31, 49151, 2**31 - 1]), min_size=1, max_size=4, unique=True))
    sym = st.integers(0, len(ids) - 1)
    bases = draw(st.lists(st.lists(sym, max_size=100), min_size=1, max_size=4))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        base = draw(st.sampled_from(bases))
        rows.append(base[: draw(st.integers(0, len(base)))] + draw(st.lists(sym, max_size=40)))
    return [[ids[s] for s in r] for r in rows]


def brute_lcp(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def check_order(rows: Rows, order: np.ndarray, lcp: np.ndarray) -> None:
    n = len(rows)
    assert order.dtype == np.int64 and lcp.dtype == np.int64
    assert sorted(order.tolist()) == list(range(n))  # a permutation: every row exactly once
    if n:
        assert lcp[0] == 0
    for i in range(1, n):
        a, b = rows[order[i - 1]], rows[order[i]]
        assert lcp[i] == brute_lcp(a, b), i
        assert a <= b  # lexicographic, a prefix before its extensions


def check_trie(rows: Rows, t) -> None:
    n = len(rows)
    check_order(rows, t.order, t.lcp)
    assert t.num_rows == n
    assert t.lengths.tolist() == [len(r) for r in rows]
    assert t.prompt_tokens == sum(map(len, rows))
    assert t.unique_tokens == len({tuple(r[:k]) for r in rows for k in range(1, len(r) + 1)})
    assert t.parent[0] == -1 and t.depth[0] == 0 and t.first[0] == 0 and t.last[0] == n - 1
    assert t.edge_len[1:].sum() == t.unique_tokens
    for node in range(1, t.num_nodes):
        p = t.parent[node]
        assert 0 <= p < t.num_nodes and p != node
        assert t.depth[p] < t.depth[node]
        assert t.first[p] <= t.first[node] <= t.last[node] <= t.last[p]
    ordered = [rows[r] for r in t.order]
    for node in range(t.num_nodes):
        d, lo, hi = int(t.depth[node]), int(t.first[node]), int(t.last[node])
        assert t.rows_under[node] == hi - lo + 1
        prefix = ordered[lo][:d] if lo <= hi else []
        for i, r in enumerate(ordered):
            has = len(r) >= d and r[:d] == prefix
            assert has == (lo <= i <= hi), (node, i)
    for r in range(n):
        node = t.row_node[r]
        assert t.depth[node] == len(rows[r])
        pos = int(np.nonzero(t.order == r)[0][0])
        assert t.first[node] <= pos <= t.last[node]
        assert t.rep_row(node) in t.order[t.first[node] : t.last[node] + 1]


def build(rows: Rows):
    return build_trie(TokenTable.from_lists(rows))


@settings(max_examples=300, deadline=None)
@given(prompt_rows())
def test_trie_matches_brute_force(rows):
    t = build(rows)
    check_trie(rows, t)
    again = build(rows)  # determinism
    for field in ("order", "lcp", "lengths", "parent", "depth", "first", "last", "row_node"):
        assert np.array_equal(getattr(t, field), getattr(again, field)), field


@settings(max_examples=150, deadline=None)
@given(prompt_rows(), st.sampled_from([1, 2, 3, 5, 32]))
def test_trie_order_any_chunk(rows, chunk):
    order, lcp = trie_order(TokenTable.from_lists(rows), chunk=chunk)
    check_order(rows, order, lcp)


@settings(max_examples=150, deadline=None)
@given(prompt_rows(), st.sampled_from([0, 1]))
def test_hash_collisions_fall_back_to_exact_sort(rows, mult):
    """With a degenerate hash (0: every chunk collides; 1: the plain sum of the tokens) the exact path must agree."""
    with mock.patch.object(trie_mod, "_MULT", np.full(256, mult, dtype=np.uint64)):
        t = build(rows)
    check_trie(rows, t)


# ------------------------------------------------------------------------------ exact hand-made structures
def shape(t) -> dict:
    """Each node as (depth, rows under it) -> its parent's (depth, rows), None for the root."""
    key = lambda n: (int(t.depth[n]), tuple(sorted(t.order[t.first[n] : t.last[n] + 1].tolist())))
    return {key(n): (key(t.parent[n]) if n else None) for n in range(t.num_nodes)}


def row_nodes(t) -> list[tuple[int, tuple[int, ...]]]:
    return [(int(t.depth[n]), tuple(sorted(t.order[t.first[n] : t.last[n] + 1].tolist()))) for n in t.row_node]


def test_system_documents_questions():
    s, d1, d2 = [1, 2, 3], [10, 11], [20, 21, 22]
    rows = [s + d2 + [103], s + d1 + [100], s + d2 + [104, 105], s + d1 + [101, 102], s + d2 + [100]]
    t = build(rows)
    check_trie(rows, t)
    root, sp, doc1, doc2 = (0, (0, 1, 2, 3, 4)), (3, (0, 1, 2, 3, 4)), (5, (1, 3)), (6, (0, 2, 4))
    assert shape(t) == {root: None, sp: root, doc1: sp, doc2: sp, (7, (0,)): doc2, (6, (1,)): doc1,
                        (8, (2,)): doc2, (7, (3,)): doc1, (7, (4,)): doc2}
    assert row_nodes(t) == [(7, (0,)), (6, (1,)), (8, (2,)), (7, (3,)), (7, (4,))]
    assert (t.num_nodes, t.prompt_tokens, t.unique_tokens) == (9, 35, 15)
    assert sorted(t.rows_under.tolist()) == [1, 1, 1, 1, 1, 2, 3, 5, 5]


def test_no_sharing():
    rows = [[4, 5, 6], [1, 2], [3]]
    t = build(rows)
    check_trie(rows, t)
    root = (0, (0, 1, 2))
    assert shape(t) == {root: None, (3, (0,)): root, (2, (1,)): root, (1, (2,)): root}
    assert t.order.tolist() == [1, 2, 0] and t.lcp.tolist() == [0, 0, 0]
    assert (t.prompt_tokens, t.unique_tokens) == (6, 6)


def test_all_identical():
    rows = [[5, 6, 7]] * 4
    t = build(rows)
    check_trie(rows, t)
    assert shape(t) == {(0, (0, 1, 2, 3)): None, (3, (0, 1, 2, 3)): (0, (0, 1, 2, 3))}
    assert len(set(t.row_node.tolist())) == 1 and t.lcp.tolist() == [0, 3, 3, 3]
    assert (t.prompt_tokens, t.unique_tokens) == (12, 3)


def test_prefix_of_another():
    rows = [[1, 2, 3, 4], [1, 2], [1, 2, 9], [1]]
    t = build(rows)
    check_trie(rows, t)
    root, a, ab = (0, (0, 1, 2, 3)), (1, (0, 1, 2, 3)), (2, (0, 1, 2))
    assert shape(t) == {root: None, a: root, ab: a, (4, (0,)): ab, (3, (2,)): ab}
    assert row_nodes(t) == [(4, (0,)), ab, (3, (2,)), a]  # prompts 1 and 3 end at inner nodes
    assert t.order.tolist() == [3, 1, 0, 2] and t.lcp.tolist() == [0, 1, 2, 2]
    assert t.unique_tokens == 5


def test_empty_and_one_token_prompts():
    rows = [[], [7], [], [7], [8]]
    t = build(rows)
    check_trie(rows, t)
    root = (0, (0, 1, 2, 3, 4))
    assert shape(t) == {root: None, (1, (1, 3)): root, (1, (4,)): root}
    assert t.row_node[0] == t.row_node[2] == 0  # empty prompts end at the root
    assert set(t.order[:2].tolist()) == {0, 2}
    assert (t.prompt_tokens, t.unique_tokens, t.num_nodes) == (3, 2, 3)


@pytest.mark.parametrize("rows", [[], [[]], [[], []], [[1, 2, 3]]])
def test_zero_one_and_empty_rows(rows):
    t = build(rows)
    check_trie(rows, t)
    n = len(rows)
    expected = {(0, tuple(range(n))): None}
    if rows and rows[0]:
        expected[(3, (0,))] = (0, (0,))
    assert shape(t) == expected
    assert t.rows_under[0] == n and t.row_node.tolist() == ([0] * n if not any(rows) else [1])


@pytest.mark.parametrize("shared", [0, 1, 31, 32, 33, 63, 64, 65, 97])
def test_branch_at_chunk_boundaries(shared):
    base = [i % 3 for i in range(shared)]
    rows = [base + [5, 1], base, base + [4] * 40, base + [5], base + [4] * 40]
    t = build(rows)
    check_trie(rows, t)
    assert t.order.tolist() == [1, 2, 4, 3, 0]
    assert t.lcp.tolist() == [0, shared, shared + 40, shared, shared + 1]
    assert t.unique_tokens == shared + 40 + 2
