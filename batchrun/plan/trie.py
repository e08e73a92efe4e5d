"""The global prefix trie over every prompt of a job, as flat numpy arrays.

Built without a dict per token: rows are first put in *trie order* (rows sharing a longer prefix are
adjacent; every subtree is a contiguous range) by an MSD refinement that compares 32-token chunks at a time,
together with the exact longest common prefix (LCP) of each row with the one before it; then one linear
pass over the LCPs builds the compressed trie, as one builds a suffix tree from a suffix array.

Chunks are compared through a 64-bit hash only to group rows; a group whose chunks differ despite equal
hashes is detected and sorted exactly, and every LCP is computed by comparing tokens, so counts are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.tokens import TokenTable

_CHUNK = 32
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@dataclass(frozen=True)
class Trie:
    """A compressed prefix trie. Node 0 is the root (the empty prefix).

    A node stands for the prefix of length ``depth[n]`` shared by every row under it; the rows under it
    are ``order[first[n] : last[n] + 1]``. Its edge holds tokens ``depth[parent[n]] .. depth[n]`` of any of
    those rows. ``row_node[r]`` is the node where row r's prompt ends (a leaf, or an inner node when the
    prompt is a prefix of others; identical prompts end at the same node).
    """

    order: np.ndarray  # int64 [rows]: rows in trie order
    lcp: np.ndarray  # int64 [rows]: LCP of order[i-1] and order[i]; lcp[0] == 0
    lengths: np.ndarray  # int64 [rows]: prompt lengths, by row
    parent: np.ndarray  # int64 [nodes]: -1 for the root
    depth: np.ndarray  # int64 [nodes]
    first: np.ndarray  # int64 [nodes]: first position in ``order`` under the node
    last: np.ndarray  # int64 [nodes]: last position in ``order`` under the node
    row_node: np.ndarray  # int64 [rows]

    @property
    def num_rows(self) -> int:
        return len(self.order)

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    @property
    def rows_under(self) -> np.ndarray:
        return self.last - self.first + 1

    @property
    def edge_len(self) -> np.ndarray:
        parent_depth = np.where(self.parent >= 0, self.depth[np.maximum(self.parent, 0)], 0)
        return self.depth - parent_depth

    @property
    def prompt_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def unique_tokens(self) -> int:
        """Tokens in the trie (each shared prefix counted once): what prefill costs with full sharing."""
        return int(self.lengths.sum() - self.lcp.sum())

    def rep_row(self, node: int) -> int:
        """A row whose prompt passes through ``node`` (to read the node's tokens)."""
        return int(self.order[self.first[node]])


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + k)`` for each (s, k)."""
    return np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))


def trie_order(table: TokenTable, chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(order, lcp): rows in trie order and each row's exact LCP with the row before it.

    Each round looks at the next ``chunk`` tokens of every row still sharing its prefix with another row:
    rows are grouped by a hash of those tokens, and the groups are put in lexicographic order of the tokens
    (only one representative per group is sorted, so a round with no branching costs one hash pass).
    """
    n = len(table)
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(n, dtype=np.int64)
    if n < 2:
        return order, lcp
    lengths = table.lengths
    offs = table.offsets[:-1]
    toks = table.tokens
    last_tok = max(len(toks) - 1, 0)
    steps = np.arange(chunk, dtype=np.int64)
    starts = np.array([0], dtype=np.int64)  # active groups: positions [start, start + size) share `d` tokens
    sizes = np.array([n], dtype=np.int64)
    d = 0
    while len(starts):
        gid = np.repeat(np.arange(len(starts)), sizes)
        pos = _ranges(starts, sizes)
        rows = order[pos]
        at = d + steps
        valid = at[None, :] < lengths[rows][:, None]
        window = toks[np.minimum(offs[rows][:, None] + at[None, :], last_tok)] if len(toks) else valid * 0
        window = np.where(valid, window.astype(np.int64), -1)  # -1 marks "the prompt has ended"
        h = np.full(len(rows), _FNV_OFFSET, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(chunk):
                h = (h ^ window[:, j].astype(np.uint64)) * _FNV_PRIME
        perm = np.lexsort((h, gid))
        rows, h, window = rows[perm], h[perm], window[perm]
        sub = np.nonzero(np.r_[True, (gid[1:] != gid[:-1]) | (h[1:] != h[:-1])])[0]
        sub_size = np.diff(np.r_[sub, len(pos)])
        if (window != np.repeat(window[sub], sub_size, axis=0)).any():  # a hash collision: sort exactly
            perm = np.lexsort(tuple(window[:, j] for j in reversed(range(chunk))) + (gid,))
            rows, window = rows[perm], window[perm]
            differs = np.r_[True, (gid[1:] != gid[:-1]) | (window[1:] != window[:-1]).any(axis=1)]
            sub = np.nonzero(differs)[0]
            sub_size = np.diff(np.r_[sub, len(pos)])
        else:  # put the subgroups of each group in lexicographic order of their tokens
            rep = window[sub]
            sperm = np.lexsort(tuple(rep[:, j] for j in reversed(range(chunk))) + (gid[sub],))
            take = _ranges(sub[sperm], sub_size[sperm])
            rows, window = rows[take], window[take]
            sub_size = sub_size[sperm]
            sub = np.cumsum(sub_size) - sub_size
        order[pos] = rows
        sub_gid = gid[sub]
        inner = np.nonzero(np.r_[False, sub_gid[1:] == sub_gid[:-1]])[0]  # subgroups that split a group
        if len(inner):
            a, b = window[sub[inner] - 1], window[sub[inner]]
            lcp[pos[sub[inner]]] = d + (a != b).argmax(axis=1)
        maxlen = np.maximum.reduceat(lengths[rows], sub)
        done = maxlen <= d + chunk  # equal padded chunks that end here: identical prompts
        for s, k in zip(sub[done & (sub_size > 1)], sub_size[done & (sub_size > 1)]):
            lcp[pos[s + 1 : s + k]] = lengths[rows[s + 1 : s + k]]
        keep = (sub_size > 1) & ~done
        starts, sizes = pos[sub[keep]], sub_size[keep]
        d += chunk
    return order, lcp


def build_trie(table: TokenTable) -> Trie:
    order, lcp = trie_order(table)
    lengths = table.lengths.astype(np.int64)
    n = len(order)
    parent, depth, first, last = [-1], [0], [0], [n - 1]
    row_node = np.zeros(n, dtype=np.int64)
    stack = [0]
    ordered_len = lengths[order].tolist()
    lcp_list = lcp.tolist()
    order_list = order.tolist()
    for i in range(n):
        common = lcp_list[i]
        closed = -1
        while depth[stack[-1]] > common:
            closed = stack.pop()
            last[closed] = i - 1
        if depth[stack[-1]] < common:  # the previous row branches off mid-edge: split that edge
            m = len(depth)
            parent.append(stack[-1]), depth.append(common), first.append(first[closed]), last.append(-1)
            parent[closed] = m
            stack.append(m)
        if ordered_len[i] > common:
            k = len(depth)
            parent.append(stack[-1]), depth.append(ordered_len[i]), first.append(i), last.append(-1)
            stack.append(k)
            row_node[order_list[i]] = k
        else:
            row_node[order_list[i]] = stack[-1]
    for node in stack:
        last[node] = n - 1
    as_array = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return Trie(order, lcp, lengths, as_array(parent), as_array(depth), as_array(first), as_array(last),
                row_node)
