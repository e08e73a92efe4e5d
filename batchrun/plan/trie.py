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
# Odd 64-bit multipliers for a chunk hash (sum of token * multiplier, mod 2**64).
_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


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
    a group whose rows all agree there (the common case inside a long shared prefix) costs one comparison;
    a group that branches is split by a hash of the chunk, and its subgroups are put in lexicographic order
    of their tokens (sorting one representative each).
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
        window = np.where(valid, window, -1).astype(np.int32, copy=False)  # -1: "the prompt has ended"
        gfirst = np.cumsum(sizes) - sizes
        same = (window == np.repeat(window[gfirst], sizes, axis=0)).all(axis=1)
        split = ~np.logical_and.reduceat(same, gfirst)  # groups whose rows differ in this chunk
        sub, sub_size = gfirst, sizes
        if split.any():
            sel = np.nonzero(np.repeat(split, sizes))[0]
            srows, swin, ssub, _ = _split(rows[sel], window[sel], gid[sel], chunk)
            rows[sel], window[sel] = srows, swin
            sub = np.sort(np.r_[gfirst[~split], sel[ssub]])
            sub_size = np.diff(np.r_[sub, len(pos)])
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


def _split(rows: np.ndarray, window: np.ndarray, gid: np.ndarray, chunk: int):
    """Within each group, gather rows with equal chunks into subgroups ordered by their tokens.

    Returns (rows, window) reordered and (start, size) of each subgroup, as indices into them.
    """
    with np.errstate(over="ignore"):
        h = (window.astype(np.uint64) * _MULT[None, :chunk]).sum(axis=1, dtype=np.uint64)
    perm = np.lexsort((h, gid))
    rows, h, window, gid = rows[perm], h[perm], window[perm], gid[perm]
    sub = np.nonzero(np.r_[True, (gid[1:] != gid[:-1]) | (h[1:] != h[:-1])])[0]
    sub_size = np.diff(np.r_[sub, len(rows)])
    if (window != np.repeat(window[sub], sub_size, axis=0)).any():  # a hash collision: sort exactly
        perm = np.lexsort(tuple(window[:, j] for j in reversed(range(chunk))) + (gid,))
        rows, window, gid = rows[perm], window[perm], gid[perm]
        differs = np.r_[True, (gid[1:] != gid[:-1]) | (window[1:] != window[:-1]).any(axis=1)]
        sub = np.nonzero(differs)[0]
        return rows, window, sub, np.diff(np.r_[sub, len(rows)])
    rep = window[sub]  # put the subgroups of each group in lexicographic order of their tokens
    sperm = np.lexsort(tuple(rep[:, j] for j in reversed(range(chunk))) + (gid[sub],))
    take = _ranges(sub[sperm], sub_size[sperm])
    sub_size = sub_size[sperm]
    return rows[take], window[take], np.cumsum(sub_size) - sub_size, sub_size


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
    as_array = lambda v: np.asarray(v, dtype=np.int64)
    return Trie(order, lcp, lengths, as_array(parent), as_array(depth), as_array(first), as_array(last),
                row_node)
