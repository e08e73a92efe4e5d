"""batchrun.engine.simulate (the engine's scheduler driven on paper), budget and OutputEstimator: properties of
the simulated run on small random jobs (every row finishes, KV stays within the budget, token counts add up,
rows too big are exactly those that cannot fit alone) and hand-made cases with exact results. Random jobs
come from test_plan.jobs.

Conventions of the simulator (see batchrun/engine/simulate.py and scheduler.py):
- a row's first output token is sampled from its last prefill position; each later token costs one decode
  step. A row producing L tokens makes L - 1 decode steps if L == max_tokens, else L (the last one samples
  EOS): ``decodes`` below;
- prefill_tokens counts every computed non-decode token (shared prefixes once, each row's own tokens, and
  the prompt + generated tokens of a preempted row when it is recomputed);
- the KV budget is used in whole blocks: the pool holds max(budget // block_size, 1) blocks (``pool``);
- a row is too big iff it does not fit alone with the shared prefixes live then (its own, and any that
  packing started ahead of it for later rows): ``least`` below.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_plan import build, chain, jobs

from batchrun.engine.simulate import simulate
from batchrun.plan.budget import blocks
from batchrun.plan.pack import PREFIX, ROW


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
    return int(blocks(int(tokens), bs)) * bs


def pool(budget, bs):
    """The KV tokens the simulator's allocator really has: whole blocks, at least one."""
    return max(budget // bs, 1) * bs


def own(plan):
    return (plan.tokens.lengths - plan.prefixes.row_start).astype(np.int64)


def prefix_kv(plan):
    g, bs = plan.prefixes, plan.config.block_size
    return [rk(e - s, bs) for s, e in zip(g.start.tolist(), g.end.tolist())]


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
                                                           _is_ancestor(g, q, ident)]
        live = sum(pre[p] for p in enclosing)
        own_need = rk(own(plan)[ident], bs) + int(plan.max_tokens[ident]) + bs - 1 if kind == ROW else pre[ident]
        out[kind, ident] = live + own_need
    return out


def _is_ancestor(g, q: int, p: int) -> bool:
    p = int(g.parent[p])
    while p >= 0:
        if p == q:
            return True
        p = int(g.parent[p])
    return False


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


def nothing_waits(plan, target):
    """(steps, peak KV) of a run where KV never makes work wait: prefill is one FIFO stream of step_tokens a
    step (started work first, then new work in pack order), every row then decodes once a step; a row's KV
    is freed after its last step, a prefix's after its last member's. Also whether the run is one of those
    that end with an empty step (see test_no_empty_step_after_the_last_chunk)."""
    g, bs, cap = plan.prefixes, plan.config.block_size, plan.config.step_tokens
    items, stale_last = stream(plan)
    total = items[-1][3]
    dec = decodes(target, plan.max_tokens)
    done, end, where = {}, {}, {}
    for kind, ident, a, b in items:
        where[kind, ident] = (a, b)
        if kind == ROW:
            done[ident] = -(-b // cap)  # the step its prefill ends (and its first token is sampled)
            end[ident] = done[ident] + int(dec[ident])
    last = {p: max(end[r] for r in range(plan.num_rows) if p in chain(g, r)) for p in range(len(g))}
    steps = max(end.values())
    peak = 0
    for t in range(1, steps + 1):
        c = min(t * cap, total)
        kv = 0
        for (kind, ident), (a, b) in where.items():
            if a >= c:
                continue
            if kind == PREFIX and t <= last[ident]:
                kv += rk(min(c, b) - a, bs)
            elif kind == ROW and t <= end[ident]:
                kv += rk(min(c, b) - a + min(max(t - done[ident], 0), int(dec[ident])), bs)
        peak = max(peak, kv)
    empty_step = stale_last and total % cap == 0 and steps == total // cap
    return steps, peak, empty_step


def lower_peak(plan, target, rows=None):
    """In its last step a row holds its prompt, its decoded tokens and its prefixes."""
    g, bs = plan.prefixes, plan.config.block_size
    dec, pre = decodes(target, plan.max_tokens), prefix_kv(plan)
    rows = range(plan.num_rows) if rows is None else rows
    return max([rk(own(plan)[r] + dec[r], bs) + sum(pre[p] for p in chain(g, r)) for r in rows], default=0)


def draw_outputs(data, max_tokens):
    """None (every row runs to max_tokens) or a true output length per row."""
    if data.draw(st.booleans()):
        return None
    return np.array([data.draw(st.integers(1, int(m))) for m in max_tokens])


# ------------------------------------------------------------------------------ random jobs
@settings(max_examples=60, deadline=None)
@given(jobs(), st.integers(0, 50), st.data())
def test_sim_budget_for_everything(job, slack, data):
    """Nothing ever waits for KV: steps, token counts and the KV peak are exactly those of a FIFO prefill."""
    rows, max_tokens, config = job
    plan = build(rows, max_tokens, config)
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    budget = rk(generous(plan) + slack, config.block_size)
    res = sim(plan, budget, outputs)
    steps, peak, _ = nothing_waits(plan, target)
    assert (res.rows_done, res.rows_too_big, res.preemptions) == (len(rows), [], 0)
    assert res.prefill_tokens == plan.prefill_tokens()
    assert res.decode_tokens == int(decodes(target, max_tokens).sum())
    assert res.peak_kv_tokens == peak <= budget
    assert res.steps == steps


@settings(max_examples=60, deadline=None)
@given(jobs(), st.integers(0, 50), st.data())
def test_sim_budget_for_the_biggest_row(job, slack, data):
    """Rows wait for each other, but every one fits alone: all finish, with exact token counts."""
    rows, max_tokens, config = job
    n, bs = len(rows), config.block_size
    est = data.draw(st.none() | st.lists(st.integers(1, 20), min_size=n, max_size=n).map(np.array))
    plan = build(rows, max_tokens, config, est)
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    budget = rk(max(needs(plan).values()), bs) + slack
    res = sim(plan, budget, outputs)
    # fewer than 32 rows: the estimate stays max_tokens, which never falls short, so nothing is preempted
    assert (res.rows_done, res.rows_too_big, res.preemptions) == (n, [], 0)
    assert res.prefill_tokens >= plan.prefill_tokens()  # a prefix evicted while its members wait is recomputed
    assert res.decode_tokens == int(decodes(target, max_tokens).sum())
    assert lower_peak(plan, target) <= res.peak_kv_tokens <= budget
    prefill_steps = -(-plan.prefill_tokens() // config.step_tokens)
    assert res.steps >= max(prefill_steps, int(decodes(target, max_tokens).max()) + 1)


@settings(max_examples=60, deadline=None)
@given(jobs(), st.data())
def test_sim_small_budget_reports_rows_too_big(job, data):
    """Every prefix fits, not every row: the rows too big are exactly those whose ``least`` exceeds the pool."""
    rows, max_tokens, config = job
    plan = build(rows, max_tokens, config)
    bs, need = config.block_size, least(plan)
    prefixes = sum(prefix_kv(plan))
    budget = prefixes + data.draw(st.integers(0, max(max(need) + bs - prefixes, 0)))
    outputs = draw_outputs(data, max_tokens)
    target = max_tokens if outputs is None else outputs
    res = sim(plan, budget, outputs)
    too_big = [r for r in range(len(rows)) if need[r] > pool(budget, bs)]
    ok = [r for r in range(len(rows)) if r not in too_big]
    assert (res.rows_too_big, res.rows_done, res.preemptions) == (too_big, len(ok), 0)
    # every prefix is computed (again, if evicted while its members waited), the rows that fit once
    assert res.prefill_tokens >= int(own(plan)[ok].sum() + plan.prefixes.tokens.sum())
    assert res.decode_tokens == int(decodes(target, max_tokens)[ok].sum())
    assert lower_peak(plan, target, ok) <= res.peak_kv_tokens <= budget


@settings(max_examples=60, deadline=None)
@given(jobs(n_rows=st.integers(33, 60), base_len=30), st.data())
def test_sim_learned_estimates_and_preemption(job, data):
    """With more than 32 rows the estimator learns from short outputs; rows that outrun it get preempted.
    A preempted row is recomputed from its prompt and the tokens it made: that prefill replaces one decode."""
    rows, max_tokens, config = job
    max_tokens = max_tokens + 10  # the first 32 rows make 1 token: a learned fraction <= 1/11
    plan = build(rows, max_tokens, config)
    budget = rk(max(needs(plan).values()), config.block_size) + data.draw(st.integers(0, 300))
    outputs = np.array([data.draw(st.integers(1, int(m)) if i >= 32 else st.just(1)) for i, m in
                        enumerate(max_tokens[plan.order])])[np.argsort(plan.order)]
    if data.draw(st.booleans()):  # rows after the first 32 run to max_tokens: beyond the learned estimate
        outputs = np.where(plan.position >= 32, max_tokens, outputs)
    res = sim(plan, budget, outputs)
    assert (res.rows_done, res.rows_too_big) == (len(rows), []) and res.peak_kv_tokens <= budget
    # each preemption of a decoding row turns one decode into prefill; of a prefilling row, none
    want = int(decodes(outputs, max_tokens).sum())
    assert want - res.preemptions <= res.decode_tokens <= want
    extra = res.prefill_tokens - plan.prefill_tokens()
    # recomputed rows (>= 1 own + 1 made token each); evicted prefixes may add more
    assert extra >= 2 * res.preemptions
