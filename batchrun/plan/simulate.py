"""Run a plan on paper: steps, KV use, preemptions — what ``batchrun plan`` projects, and what tests check.

Each step is one forward pass: up to ``step_tokens`` of prefill from the plan's packs (as much as the KV
budget admits) plus one token for every row past its prefill (the step that finishes a row's prefill also
yields its first token). Admission uses the projected future peak (``budget.fits``) with output estimates
that learn from finished rows. Should real lengths outrun the estimates, the newest rows are preempted
(their KV freed, recomputed later), so the KV in use never exceeds the budget — the rule the engine follows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from batchrun.plan.budget import blocks, fits
from batchrun.plan.order import OutputEstimator
from batchrun.plan.pack import PREFIX

_REQUEUE = -1


@dataclass(frozen=True)
class SimResult:
    steps: int
    prefill_tokens: int
    decode_tokens: int
    peak_kv_tokens: int  # the most KV (block-rounded tokens) in use at once
    preemptions: int
    rows_done: int
    rows_too_big: list[int]  # rows that cannot run even alone within the budget

    def to_dict(self) -> dict:
        return asdict(self)


class _Running:
    """Rows holding KV: parallel lists, compacted once a step."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.kv: list[int] = []  # own KV tokens materialized (prompt part + generated)
        self.todo: list[int] = []  # own prompt tokens still to prefill
        self.made: list[int] = []
        self.members: set[int] = set()

    def add(self, row: int, todo: int, made: int) -> None:
        self.row.append(row), self.kv.append(0), self.todo.append(todo), self.made.append(made)
        self.members.add(row)

    def keep(self, idx: list[int]) -> None:
        gone = set(self.row) - {self.row[i] for i in idx}
        self.members -= gone
        self.row, self.kv, self.todo, self.made = ([v[i] for i in idx] for v in (self.row, self.kv, self.todo,
                                                                                   self.made))


def simulate(plan, kv_budget: int, outputs: np.ndarray | None = None) -> SimResult:
    """Simulate ``plan`` (a ``batchrun.plan.plan.Plan``); ``outputs`` are the true output lengths
    (default: each row's max_tokens)."""
    cfg = plan.config
    bs = cfg.block_size
    lengths = plan.tokens.lengths
    max_tokens = plan.max_tokens
    target = np.minimum(np.maximum(np.asarray(max_tokens if outputs is None else outputs), 1), max_tokens)
    estimator = OutputEstimator(max_tokens)
    pre = plan.prefixes
    refs = pre.members.copy()
    live: dict[int, int] = {}  # prefix -> KV tokens (block-rounded)
    own_start = pre.row_start
    run = _Running()
    pending: deque = deque()
    packs = plan.packs()
    skip: set[int] = set()
    steps = prefill = decode = peak = preempted = done = 0
    too_big: list[int] = []
    rk = lambda t: int(blocks(t, bs)) * bs

    while True:
        if not pending:
            nxt = next(packs, None)
            if nxt is not None:
                pending.extend(tuple(x) for x in nxt.tolist())
        if not pending and not run.row:
            break
        steps += 1
        frac = estimator.fraction
        est = lambda row, made, frac=frac: max(int(np.ceil(max_tokens[row] * frac)) - made, 1)
        cur = [rk(k + t) for k, t in zip(run.kv, run.todo)]
        rem = [est(r, m) for r, m in zip(run.row, run.made)]
        budget_left = cfg.step_tokens
        while pending and budget_left > 0:
            kind, ident, start, end = pending[0]
            if kind != PREFIX and ident in skip:
                pending.popleft()
                continue
            new_row = kind != PREFIX and ident not in run.members
            made = start if kind == _REQUEUE else 0  # a requeued row carries its generated count in `start`
            todo = int(lengths[ident] - own_start[ident]) + made if new_row else 0
            add_cur = [rk(todo)] if new_row else []
            add_rem = [est(ident, made)] if new_row else []
            add_prefix = rk(end - start) if kind == PREFIX else 0
            if (new_row or kind == PREFIX) and not fits(np.array(cur + add_cur, dtype=np.int64),
                                                       np.array(rem + add_rem, dtype=np.int64),
                                                       sum(live.values()) + add_prefix, kv_budget, bs):
                if run.row:
                    break  # wait: running rows will finish and free memory
                if kind == PREFIX:
                    raise ValueError(f"the KV budget ({kv_budget} tokens) cannot hold shared prefix {ident} "
                                     f"({end - start} tokens) with what it needs; raise the KV budget")
                pending.popleft()  # alone and still too big: this row cannot run
                too_big.append(int(ident))
                skip.add(int(ident))
                continue
            pending.popleft()
            if kind == PREFIX:
                live[ident] = add_prefix
                chunk = end - start
            else:
                if new_row:
                    run.add(ident, todo, made)
                    cur += add_cur
                    rem += add_rem
                i = len(run.row) - 1 if new_row else run.row.index(ident)
                chunk = todo if kind == _REQUEUE else end - start
                run.kv[i] += chunk
                run.todo[i] = max(run.todo[i] - chunk, 0)
            prefill += chunk
            budget_left -= chunk
        # One token for every row past its prefill; finished rows free their KV and prefix references.
        keep = []
        for i, row in enumerate(run.row):
            if run.todo[i] == 0:
                run.kv[i] += 1
                run.made[i] += 1
                decode += 1
            if run.made[i] >= target[row]:
                done += 1
                estimator.observe(int(max_tokens[row]), int(run.made[i]))
                p = pre.row_prefix[row]
                while p >= 0:
                    refs[p] -= 1
                    if refs[p] == 0:
                        live.pop(int(p), None)
                    p = pre.parent[p]
            else:
                keep.append(i)
        run.keep(keep)
        used = sum(rk(k) for k in run.kv) + sum(live.values())
        while used > kv_budget and len(run.row) > 1:  # estimates were short: preempt the newest decoding row
            victim = next((i for i in range(len(run.row) - 1, -1, -1) if run.todo[i] == 0), None)
            if victim is None:
                break
            row, made, kv = run.row[victim], run.made[victim], run.kv[victim]
            run.keep([i for i in range(len(run.row)) if i != victim])
            pending.appendleft((_REQUEUE, row, made, made))
            used -= rk(kv)
            preempted += 1
        peak = max(peak, used)
    return SimResult(steps, prefill, decode, peak, preempted, done, too_big)
