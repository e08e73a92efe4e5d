"""Shards: the plan cut into pieces for several workers, along the prefix trie.

Every row belongs to a *unit*: the rows under one outermost shared prefix (with every prefix nested in it), or a
row with no shared prefix alone. A unit's cost is the prefill it computes (each of its prefixes once, each
row's own tokens) plus its rows' estimated output tokens. A unit within a fair share (the job's cost over the
number of shards) stays whole, so none of its prefixes is computed twice. The units over a fair share, largest
first, fill shards one after another, each up to a fair share, in plan order: a cut falls where a shard is
full, moved a little (``SNAP``) to fall between two rows under different prefixes just below the unit's
outermost one, and the prefixes a cut goes through are computed once more (``duplicated_prefill``; the fair
share is then recomputed with them counted in). The units within a fair share go, largest first, each onto
the cheapest shard so far. Shards are numbered by cost, largest first, so that workers taking the next shard
from a queue start with the big ones. Several shards a worker are tried (``PER_WORKER_TRIES``) until both the
shards and the workers that take them balance within ``BALANCED``. Plain numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchrun.plan.plan import Plan

# Shards a worker, tried in turn until the shards balance within BALANCED: few (each shard is one engine run,
# whose tail leaves the GPU part idle, and each cut computes prefixes again), more where balance needs them
PER_WORKER_TRIES = (2, 3, 4, 6, 8)
BALANCED = 1.10  # the largest shard's cost over the mean
SNAP = 0.05  # a cut moves up to this share of a piece to fall between two prefixes


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


def shard_plan(plan: Plan, workers: int, per_worker: int | None = None) -> Shards:
    """Cut ``plan`` into about ``workers * per_worker`` shards (see the module's docstring). Without
    ``per_worker``, the first of ``PER_WORKER_TRIES`` that balances within ``BALANCED`` (else the best)."""
    if workers < 1 or (per_worker is not None and per_worker < 1):
        raise ValueError("workers and per_worker must be at least 1")
    if per_worker is not None:
        return _shard(plan, workers, per_worker)
    best = None
    for k in PER_WORKER_TRIES:
        shards = _shard(plan, workers, k)
        worst = max(shards.balance, _worker_balance(shards.cost, workers))
        if worst <= BALANCED:
            return shards
        best = (shards, worst) if best is None or worst < best[1] else best
    return best[0]


def _worker_balance(costs: np.ndarray, workers: int) -> float:
    """The busiest worker's cost over the mean when shards go, largest first, to the first free worker."""
    loads = np.zeros(workers, dtype=np.int64)
    for c in costs.tolist():
        loads[int(np.argmin(loads))] += c
    return float(loads.max() / loads.mean()) if loads.mean() else 1.0


def _shard(plan: Plan, workers: int, per_worker: int) -> Shards:
    """Cut at a fair share of the job's cost; then again with the prefill that the cuts compute twice counted
    in (at most half the job's cost: cutting where prefixes outweigh rows is pointless anyway)."""
    first = _cut(plan, workers * per_worker, 0)
    if not first.duplicated_prefill:
        return first
    return _cut(plan, workers * per_worker, min(first.duplicated_prefill, int(first.cost.sum()) // 2))


def _cut(plan: Plan, shards: int, extra: int) -> Shards:
    n = plan.num_rows
    if n == 0:
        return Shards(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0)
    p = plan.prefixes
    outermost = _outermost(p.parent, p.row_prefix)
    own = plan.tokens.lengths - p.row_start + plan.est_output
    unit_of = np.where(outermost >= 0, outermost, len(p.parent) + np.arange(n))  # (a row alone: its own unit)
    units: dict[int, list[int]] = {}
    for r in plan.order.tolist():  # (rows in plan order: a unit's rows stay in the order the plan runs them)
        units.setdefault(int(unit_of[r]), []).append(r)
    target = max(1, min(shards, n))
    total = int(own.sum() + p.tokens.sum()) + extra
    fair = max(1, -(-total // target))
    row_shard = np.empty(n, dtype=np.int64)
    small: list[tuple[int, list[int], int]] = []  # (cost, rows, prefix tokens): units placed whole
    stream: list[tuple[int, np.ndarray]] = []  # the units over a fair share, each with its cut boundaries
    for root, rows in units.items():
        step = _incremental(rows, own, p)
        if int(step.sum()) <= fair:
            small.append(_piece(rows, int(own[rows].sum()), p))
        else:
            stream.append((root, rows))
    # Units over a fair share, largest first, fill shards one after another up to a fair share each (the
    # rows' own cost and the prefixes they need), cut where that is reached, moved up to SNAP of a share to
    # fall where the fewest prefixes are shared.
    loads: list[int] = []
    computed = 0  # prefix tokens over every shard
    for root, rows in sorted(stream, key=lambda u: -len(u[1])):
        bounds = _boundaries(rows, root, p)  # (sorted)
        start = 0
        while start < len(rows):
            cum = _window(rows, start, own, p, fair)
            end = int(np.searchsorted(cum, fair, side="left")) + 1
            inside = bounds[(bounds > start) & (bounds <= start + len(cum))] - start
            near = [int(e) for e in inside if abs(int(cum[e - 1]) - fair) <= fair * SNAP]
            if near:
                end = min(near, key=lambda e: abs(int(cum[e - 1]) - fair))
            end = min(max(end, 1), len(rows) - start)
            at_end = start + len(cum) == len(rows)  # (else what follows is more than a sliver)
            if at_end and len(rows) - start - end > 0 and int(cum[-1] - cum[end - 1]) < fair * SNAP:
                end = len(rows) - start  # (no sliver of a shard at the end)
            chunk = rows[start:start + end]
            cost, _, prefix = _piece(chunk, int(own[chunk].sum()), p)
            row_shard[chunk] = len(loads)
            loads.append(cost)
            computed += prefix
            start += end
    # Units within a fair share, largest first, each onto the cheapest shard so far.
    loads_arr = np.zeros(max(target, len(loads)), dtype=np.int64)
    loads_arr[:len(loads)] = loads
    for cost, rows, prefix in sorted(small, key=lambda x: -x[0]):
        s = int(np.argmin(loads_arr))
        loads_arr[s] += cost
        row_shard[rows] = s
        computed += prefix
    loads, target = loads_arr, len(loads_arr)
    used = np.flatnonzero(loads)  # (fewer pieces than shards: the empty ones go)
    rank = np.argsort(-loads[used], kind="stable")
    renumber = np.full(target, -1, dtype=np.int64)
    renumber[used[rank]] = np.arange(len(used))
    return Shards(renumber[row_shard], loads[used][rank], computed - int(p.tokens.sum()))


def _boundaries(rows: list[int], root: int, p) -> np.ndarray:
    """Positions i in ``rows`` where row i is under another prefix just below the unit's ``root`` than row i-1
    (a cut there computes only the root again, not a deeper prefix too)."""
    group = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        q = int(p.row_prefix[r])
        while q >= 0 and int(p.parent[q]) >= 0 and int(p.parent[q]) != root:
            q = int(p.parent[q])
        group[i] = q if q >= 0 and q != root else -1 - i  # (directly under the root: every row its own)
    return np.flatnonzero(group[1:] != group[:-1]) + 1


def _snap(cuts: np.ndarray, cum: np.ndarray, boundaries: np.ndarray, tolerance: float) -> list[int]:
    """Move each cut to the nearest boundary whose cost position is within ``tolerance``."""
    out = []
    for c in cuts.tolist():
        if len(boundaries):
            j = int(np.argmin(np.abs(cum[boundaries - 1] - cum[c - 1])))
            if abs(int(cum[boundaries[j] - 1]) - int(cum[c - 1])) <= tolerance:
                c = int(boundaries[j])
        out.append(c)
    return sorted(set(out))


def _outermost(parent: np.ndarray, row_prefix: np.ndarray) -> np.ndarray:
    """Each row's outermost shared prefix (-1: none)."""
    top = np.arange(len(parent))
    while len(top) and (parent[top] >= 0).any():
        top = np.where(parent[top] >= 0, parent[top], top)
    return np.where(row_prefix >= 0, top[np.maximum(row_prefix, 0)] if len(top) else -1, -1)


def _window(rows: list[int], start: int, own: np.ndarray, p, fair: int) -> np.ndarray:
    """The cumulative cost of ``rows[start:]`` as one shard (``_incremental``), only as far as the cut can fall:
    past a fair share and its SNAP, and a SNAP past the row that first reaches it (or to the end)."""
    seen: set[int] = set()
    out: list[int] = []
    total, stop = 0, None
    for r in rows[start:]:
        total += int(own[r])
        q = int(p.row_prefix[r])
        while q >= 0 and q not in seen:
            seen.add(q)
            total += int(p.tokens[q])
            q = int(p.parent[q])
        out.append(total)
        if stop is None and total >= fair:
            stop = max(fair * (1 + SNAP), total) + fair * SNAP
        if stop is not None and total >= stop:
            break
    return np.asarray(out, dtype=np.int64)


def _incremental(rows: list[int], own: np.ndarray, p) -> np.ndarray:
    """Each row's cost in a run of ``rows`` (in order): its own, plus the prefixes it is the first to need."""
    seen: set[int] = set()
    out = own[rows].astype(np.int64)
    for i, r in enumerate(rows):
        q = int(p.row_prefix[r])
        while q >= 0 and q not in seen:
            seen.add(q)
            out[i] += int(p.tokens[q])
            q = int(p.parent[q])
    return out


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
