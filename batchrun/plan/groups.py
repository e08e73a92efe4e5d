"""Which prefixes of the trie are worth sharing, at every level, and which shared prefix each row uses.

A trie node with k rows under it, whose tokens since the nearest shared ancestor number L, saves
(k - 1) * L prefill tokens if its KV is computed once. Sharing has a cost: one more attention segment
and a partly filled KV block per level, counted as ``overhead_tokens``. The node is shared when the saving
exceeds the cost — BatchLLM's gain rule, applied top-down so that a small node's tokens fold into its
children instead of forming a level of its own; unlike BatchLLM's one-level collapse, levels nest
(system prompt → document → question). Identical prompts (``n`` samples of a row) end at the same node:
they share all of it but its last token, which each row keeps as its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.plan.trie import Trie

DEFAULT_OVERHEAD_TOKENS = 16


@dataclass(frozen=True)
class PrefixGroups:
    """Shared prefixes, numbered 0..P-1 in trie (parent-before-child) order.

    Prefix p covers tokens ``start[p]:end[p]`` of every member row; tokens ``0:start[p]`` belong to its
    enclosing prefix ``parent[p]`` (-1: none, start is 0). ``row_prefix[r]`` is the innermost prefix row
    r uses (-1: none); a row always keeps at least one token of its own, so ``end < length`` for it.
    """

    node: np.ndarray  # int64 [P]: trie node of each prefix (end is its depth, or one less: identical prompts)
    parent: np.ndarray  # int64 [P]
    start: np.ndarray  # int64 [P]
    end: np.ndarray  # int64 [P]
    members: np.ndarray  # int64 [P]: rows using this prefix (directly or through a nested one)
    row_prefix: np.ndarray  # int64 [rows]

    def __len__(self) -> int:
        return len(self.node)

    @property
    def tokens(self) -> np.ndarray:
        return self.end - self.start

    @property
    def row_start(self) -> np.ndarray:
        """Per row: where its own tokens begin (the end of its innermost shared prefix, or 0)."""
        if not len(self.node):
            return np.zeros(len(self.row_prefix), dtype=np.int64)
        return np.where(self.row_prefix >= 0, self.end[np.maximum(self.row_prefix, 0)], 0)

    def share_degrees(self) -> dict[int, int]:
        """{members: how many prefixes have that many}"""
        values, counts = np.unique(self.members, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


def choose_prefixes(trie: Trie, overhead_tokens: int = DEFAULT_OVERHEAD_TOKENS) -> PrefixGroups:
    n_nodes = trie.num_nodes
    under = trie.rows_under
    depth = trie.depth
    # A row must keep >= 1 token of its own, so only rows longer than a node can share it.
    candidates = np.nonzero((under >= 2) & (depth > 0))[0]
    candidates = candidates[np.argsort(depth[candidates], kind="stable")]  # parents before children
    shared_of = np.full(n_nodes, -1, dtype=np.int64)  # node -> nearest shared ancestor-or-self prefix id
    parent = trie.parent
    nodes, parents, starts, ends = [], [], [], []
    # Rows ending exactly at a node cannot use it; count, per node, rows that run past it.
    ends_here = np.bincount(trie.row_node, minlength=n_nodes)
    for node in candidates.tolist():
        anc = int(shared_of[parent[node]])  # every ancestor but the root is a candidate, decided already
        start = ends[anc] if anc >= 0 else 0
        d, here = int(depth[node]), int(ends_here[node])
        users = int(under[node]) - here
        end, gain = d, (users - 1) * (d - start) if users >= 2 else 0
        if here >= 2 and (int(under[node]) - 1) * (d - 1 - start) > gain:
            # Identical prompts end here: every row under the node can share all of it but the last token.
            end, gain = d - 1, (int(under[node]) - 1) * (d - 1 - start)
        if gain > overhead_tokens:
            shared_of[node] = len(nodes)
            nodes.append(node), parents.append(anc), starts.append(start), ends.append(end)
        else:
            shared_of[node] = anc
    node_arr = np.asarray(nodes, dtype=np.int64)
    groups_parent = np.asarray(parents, dtype=np.int64)
    row_prefix = _row_prefixes(trie, node_arr, groups_parent, np.asarray(ends, dtype=np.int64))
    members = np.bincount(row_prefix[row_prefix >= 0], minlength=len(nodes)).astype(np.int64)
    for p in range(len(nodes) - 1, -1, -1):  # children come after parents: add nested members upwards
        if groups_parent[p] >= 0:
            members[groups_parent[p]] += members[p]
    return PrefixGroups(node_arr, groups_parent, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64),
                        members, row_prefix)


def _row_prefixes(trie: Trie, nodes: np.ndarray, groups_parent: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Innermost shared prefix of each row: the deepest prefix node on its path, shorter than the row."""
    row_prefix = np.full(trie.num_rows, -1, dtype=np.int64)
    if not len(nodes):
        return row_prefix
    # Subtrees are contiguous ranges of trie order: paint each prefix's range, outer prefixes first.
    painted = np.full(trie.num_rows, -1, dtype=np.int64)
    for p in np.argsort(trie.depth[nodes], kind="stable").tolist():
        node = nodes[p]
        painted[trie.first[node] : trie.last[node] + 1] = p
    rows = trie.order
    row_prefix[rows] = painted
    # A row ending exactly at its prefix's end uses the enclosing prefix instead.
    lengths = trie.lengths
    bad = np.nonzero((row_prefix >= 0) & (ends[np.maximum(row_prefix, 0)] >= lengths))[0]
    for r in bad.tolist():
        p = row_prefix[r]
        while p >= 0 and ends[p] >= lengths[r]:
            p = groups_parent[p]
        row_prefix[r] = p
    return row_prefix
