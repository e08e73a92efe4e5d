"""Shards: the plan cut into pieces for several workers, along the prefix trie (issue 14's first step).

Every row belongs to a *unit*: the rows under one outermost shared prefix (with every prefix nested in it), or a
row with no shared prefix alone. A unit's cost is the prefill it computes — each of its prefixes once, each
row's own tokens — plus its rows' estimated output tokens. A unit stays in one shard, so no shared prefix is
computed twice, unless it costs more than a fair share (the job's cost over the number of shards): then it is
cut, in plan order, into pieces of about a fair share, and each piece computes the prefixes its rows need, so
the prefixes cut through are computed once per piece (``duplicated_prefill``). Pieces go to shards largest
first, each onto the cheapest shard so far; shards are numbered by cost, largest first, so that workers taking
the next shard from a queue start with the big ones. Plain numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.plan.plan import Plan

SHARDS_PER_WORKER = 4  # several shards a worker: a fast worker takes the next one


@dataclass(frozen=True)
class Shards:
    row_shard: np.ndarray  # int64 [rows]: each row's shard
    cost: np.ndarray  # int64 [shards]: prefill tokens computed (prefixes once per shard) + estimated outputs
    duplicated_prefill: int  # prefix tokens computed more than once (units cut into pieces)

    @property
    def count(self) -> int:
        return len(self.cost)

    @property
    def balance(self) -> float:
        """The largest shard's cost over the mean (1.0: perfectly even)."""
        return float(self.cost.max() / self.cost.mean()) if len(self.cost) and self.cost.mean() else 1.0

    def rows(self, shard: int) -> np.ndarray:
        """The rows of ``shard``, in plan order (indices into the plan's rows)."""
        return np.flatnonzero(self.row_shard == shard)

    def report(self) -> dict:
        return {"shards": self.count, "cost": self.cost.tolist(), "balance": round(self.balance, 3),
                "duplicated_prefill_tokens": self.duplicated_prefill}


def shard_plan(plan: Plan, workers: int, per_worker: int = SHARDS_PER_WORKER) -> Shards:
    """Cut ``plan`` into at most ``workers * per_worker`` shards (see the module's docstring)."""
    if workers < 1 or per_worker < 1:
        raise ValueError("workers and per_worker must be at least 1")
    n = plan.num_rows
    if n == 0:
        return Shards(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)
    p = plan.prefixes
    outermost = _outermost(p.parent, p.row_prefix)
    own = plan.tokens.lengths - p.row_start + plan.est_output
    unit_of = np.where(outermost >= 0, outermost, len(p.parent) + np.arange(n))  # (a row alone: its own unit)
    ordered = plan.order  # rows in plan order: a unit's rows stay in the order the plan runs them
    units: dict[int, list[int]] = {}
    for r in ordered.tolist():
        units.setdefault(int(unit_of[r]), []).append(r)
    target = max(1, min(workers * per_worker, n))
    total = int(own.sum() + p.tokens.sum())
    fair = max(1, -(-total // target))
    pieces: list[tuple[int, list[int]]] = []  # (cost, rows)
    computed = 0  # prefix tokens over every piece
    for rows in units.values():
        chunk: list[int] = []
        cost = 0
        for r in rows:
            chunk.append(r)
            cost += int(own[r])
            if cost >= fair:
                pieces.append(_piece(chunk, cost, p))
                computed += pieces[-1][2]
                chunk, cost = [], 0
        if chunk:
            pieces.append(_piece(chunk, cost, p))
            computed += pieces[-1][2]
    loads = np.zeros(target, dtype=np.int64)
    row_shard = np.empty(n, dtype=np.int64)
    for cost, rows, _ in sorted(pieces, key=lambda x: -x[0]):
        s = int(np.argmin(loads))
        loads[s] += cost
        row_shard[rows] = s
    used = np.flatnonzero(loads)  # (fewer pieces than shards: the empty ones go)
    rank = np.argsort(-loads[used], kind="stable")
    renumber = np.full(target, -1, dtype=np.int64)
    renumber[used[rank]] = np.arange(len(used))
    return Shards(renumber[row_shard], loads[used][rank], computed - int(p.tokens.sum()))


def _outermost(parent: np.ndarray, row_prefix: np.ndarray) -> np.ndarray:
    """Each row's outermost shared prefix (-1: none)."""
    top = np.arange(len(parent))
    while len(top) and (parent[top] >= 0).any():
        top = np.where(parent[top] >= 0, parent[top], top)
    return np.where(row_prefix >= 0, top[np.maximum(row_prefix, 0)] if len(top) else -1, -1)


def _piece(rows: list[int], own_cost: int, p) -> tuple[int, list[int], int]:
    """(cost, rows, prefix tokens) of a piece: its rows' own cost plus every prefix they need, once."""
    needed: set[int] = set()
    for r in rows:
        q = int(p.row_prefix[r])
        while q >= 0 and q not in needed:
            needed.add(q)
            q = int(p.parent[q])
    prefix = int(p.tokens[list(needed)].sum()) if needed else 0
    return own_cost + prefix, rows, prefix
