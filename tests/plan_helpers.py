"""Helpers for the tests of plans and of the scheduler through its simulator (``batchrun/engine/simulate.py``):
hypothesis strategies for jobs, building plans, walking the prefix trie, and the reference figures a simulated
run is checked against. Test modules import them from here (``from plan_helpers import build``).

Conventions of the simulator (see batchrun/engine/simulate.py and scheduler.py), used by the helpers below:
- a row's first output token is sampled from its last prefill position; each later token costs one decode
  step. A row producing L tokens makes L - 1 decode steps if L == max_tokens, else L (the last one samples
  EOS): ``decodes``;
- prefill_tokens counts every computed non-decode token (shared prefixes once, each row's own tokens, and
  the prompt + generated tokens of a preempted row when it is recomputed);
- the KV budget is used in whole blocks: the pool holds budget // block_size blocks (``pool``);
- a row is too big iff it does not fit alone with the shared prefixes live then (its own, and any that
  packing started ahead of it for later rows): ``least``.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
from hypothesis import strategies as st

from batchrun.engine.simulate import simulate
from batchrun.plan.budget import blocks
from batchrun.plan.pack import PREFIX, ROW
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.tokens import TokenTable

Rows = list[list[int]]


# ------------------------------------------------------------------------------ plans
STEP_TOKENS = st.integers(8, 32) | st.integers(8, 200)  # small capacities often, so rows get chunked
FEW_ROWS = st.integers(1, 12)


@st.composite
def jobs(draw, step_tokens=STEP_TOKENS, n_rows=FEW_ROWS, base_len=80):
    """(rows, max_tokens, config): runnable rows (>= 1 token) cut from 1-4 base sequences plus random tails."""
    ids = draw(st.lists(st.sampled_from([0, 1, 2, 7, 31, 49151]), min_size=1, max_size=3, unique=True))
    sym = st.sampled_from(ids)
    bases = draw(st.lists(st.lists(sym, max_size=base_len), min_size=1, max_size=4))
    rows = []
    for _ in range(draw(n_rows)):
        base = draw(st.sampled_from(bases))
        row = base[: draw(st.integers(0, len(base)))] + draw(st.lists(sym, max_size=40))
        rows.append(row or [draw(sym)])
    max_tokens = np.array(draw(st.lists(st.integers(1, 20), min_size=len(rows), max_size=len(rows))))
    config = PlanConfig(step_tokens=draw(step_tokens), block_size=draw(st.sampled_from([1, 4, 16])),
                        overhead_tokens=draw(st.sampled_from([0, 16])), window_packs=draw(st.sampled_from([1, 2, 8])))
    return rows, max_tokens, config


def build(rows: Rows, max_tokens, config: PlanConfig | None = None, est=None):
    return build_plan(TokenTable.from_lists(rows), np.asarray(max_tokens, dtype=np.int64), config, est)


def chain(g, row: int) -> list[int]:
    """The shared prefixes row uses, innermost first."""
    out, p = [], int(g.row_prefix[row])
    while p >= 0:
        out.append(p)
        p = int(g.parent[p])
    return out


def is_ancestor(g, q: int, p: int) -> bool:
    """Whether shared prefix q encloses shared prefix p."""
    p = int(g.parent[p])
    while p >= 0:
        if p == q:
            return True
        p = int(g.parent[p])
    return False


# ------------------------------------------------------------------------------ the simulator
@contextmanager
def time_limit(seconds: float):
    """Turn a hang (a simulation that never ends) into a failure."""
    def boom(*_):
        raise TimeoutError(f"did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sim(plan, budget, outputs=None, initial_estimate=1.0, seconds=10.0):
    with time_limit(seconds):
        return simulate(plan, budget, outputs, initial_estimate=initial_estimate)


def rk(tokens, bs):
    """Tokens rounded up to whole KV blocks."""
    return int(blocks(int(tokens), bs)) * bs


def pool(budget, bs):
    """The KV tokens the simulator's allocator really has: the budget's whole blocks."""
    return budget // bs * bs


def own(plan):
    """Per row: the prompt tokens it computes itself (after its shared prefixes)."""
    return (plan.tokens.lengths - plan.prefixes.row_start).astype(np.int64)


def prefix_kv(plan):
    g, bs = plan.prefixes, plan.config.block_size
    return [rk(e - s, bs) for s, e in zip(g.start.tolist(), g.end.tolist())]


def stream(plan):
    """Prefill work in the order the scheduler starts it: the first chunk of each item, pack by pack.
    Returns [(kind, id, start, end)] in stream coordinates, and whether the last pack item is a later chunk."""
    g = plan.prefixes
    items = [tuple(x) for pack in plan.packs() for x in pack.tolist()]
    out, seen, at = [], set(), 0
    for kind, ident, _, _ in items:
        if (kind, ident) in seen:
            continue
        seen.add((kind, ident))
        n = int(g.end[ident] - g.start[ident]) if kind == PREFIX else int(own(plan)[ident])
        out.append((kind, ident, at, at + n))
        at += n
    last_is_later_chunk = [x[:2] for x in items].index(items[-1][:2]) < len(items) - 1
    return out, last_is_later_chunk


def needs(plan):
    """Per stream item ((ROW, r) or (PREFIX, p)): the KV the scheduler asks to start it when nothing runs: a
    row's block-rounded prompt + max_tokens (the estimate) + the projection's block slack, or a prefix's
    blocks, plus its own enclosing prefixes (prefixes held for other, waiting rows are evicted when nothing
    runs, so they do not count)."""
    g, bs, pre = plan.prefixes, plan.config.block_size, prefix_kv(plan)
    items, _ = stream(plan)
    out = {}
    for kind, ident, _, _ in items:
        enclosing = chain(g, ident) if kind == ROW else [q for q in range(len(g)) if q != ident and
                                                           is_ancestor(g, q, ident)]
        live = sum(pre[p] for p in enclosing)
        own_need = rk(own(plan)[ident], bs) + int(plan.max_tokens[ident]) + bs - 1 if kind == ROW else pre[ident]
        out[kind, ident] = live + own_need
    return out


def least(plan):
    """Per row: the KV needed to admit it alone; a row is too big iff this exceeds the pool."""
    need = needs(plan)
    return [need[ROW, r] for r in range(plan.num_rows)]


def generous(plan):
    """A budget under which nothing ever waits for KV: every row's admission need at any time (a running
    row's block-rounded KV + remaining estimate + the projection's block slack) plus every prefix."""
    bs = plan.config.block_size
    need = sum(rk(o, bs) + int(m) + 2 * (bs - 1) for o, m in zip(own(plan), plan.max_tokens))
    return need + sum(prefix_kv(plan))


def decodes(target, max_tokens):
    """Decode steps per row: the first token comes from prefill; a row stopped by EOS pays one more."""
    target, max_tokens = np.asarray(target), np.asarray(max_tokens)
    return np.where(target == max_tokens, target - 1, target)


def lower_peak(plan, target, rows=None):
    """A lower bound of the KV peak: in its last step a row holds its prompt, its decoded tokens and its
    prefixes."""
    g, bs = plan.prefixes, plan.config.block_size
    dec, pre = decodes(target, plan.max_tokens), prefix_kv(plan)
    rows = range(plan.num_rows) if rows is None else rows
    return max([rk(own(plan)[r] + dec[r], bs) + sum(pre[p] for p in chain(g, r)) for r in rows], default=0)


def at_once(plan, target):
    """A schedule-independent upper bound of the KV peak without preemption: every row at its largest (prompt
    and all its decoded tokens) and every shared prefix, all live at once."""
    bs = plan.config.block_size
    dec = decodes(target, plan.max_tokens)
    return sum(rk(o + d, bs) for o, d in zip(own(plan), dec)) + sum(prefix_kv(plan))


def draw_outputs(data, max_tokens):
    """None (every row runs to max_tokens) or a true output length per row."""
    if data.draw(st.booleans()):
        return None
    return np.array([data.draw(st.integers(1, int(m))) for m in max_tokens])


def check_run(plan, budget, res, outputs=None) -> list[int]:
    """Invariants of every simulated run, whatever the schedule; returns the rows that finished.

    Every row finishes or is reported too big (once); KV is held in whole blocks and never exceeds the
    budget's; a step computes at most step_tokens of prefill; each finished row's own prompt is computed and
    its decodes made (fewer only by preemptions, each of which turns one decode into prefill; more only by
    rows later found too big); a finished row needs at least 1 + its decodes steps; the peak is at least what
    the largest finished row holds at its end.
    """
    n, bs, cap = plan.num_rows, plan.config.block_size, plan.config.step_tokens
    target = plan.max_tokens if outputs is None else np.asarray(outputs)
    too_big = res.rows_too_big
    assert too_big == sorted(set(too_big)) and all(0 <= r < n for r in too_big)
    assert res.rows_done + len(too_big) == n
    ok = [r for r in range(n) if r not in too_big]
    assert 0 <= res.peak_kv_tokens <= pool(budget, bs) and res.peak_kv_tokens % bs == 0
    assert res.steps * cap >= res.prefill_tokens >= int(own(plan)[ok].sum())
    dec = decodes(target, plan.max_tokens)
    want = int(dec[ok].sum())  # (a row admitted on a low estimate may decode before it outgrows the pool alone)
    assert res.preemptions >= 0 and want - res.preemptions <= res.decode_tokens <= want + int(dec[too_big].sum())
    if ok:
        assert res.steps >= int(dec[ok].max()) + 1
        assert res.peak_kv_tokens >= lower_peak(plan, target, ok)
    return ok
