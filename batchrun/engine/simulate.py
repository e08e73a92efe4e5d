"""Run a plan on paper: the engine's own scheduler and KV manager, with a stand-in for the model.

``batchrun plan`` uses it to project steps and KV peak, and tests use it to check that the KV budget is
never exceeded. The stand-in "model" makes each row produce its given number of tokens (default: all of
``max_tokens``); everything else — admission, chunking, prefix lifetimes, preemption — is the scheduler's,
so the projection and the real run follow one rule. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from batchrun.engine.kv import KVManager
from batchrun.engine.requests import Request
from batchrun.engine.scheduler import Scheduler
from batchrun.plan.plan import Plan

_EOS = -1


@dataclass(frozen=True)
class SimResult:
    steps: int
    prefill_tokens: int
    decode_tokens: int
    peak_kv_tokens: int  # the most KV (whole blocks, in tokens) held at once
    preemptions: int
    rows_done: int
    rows_too_big: list[int]  # rows that cannot fit the budget even alone

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(plan: Plan, kv_budget: int, outputs: np.ndarray | None = None,
             initial_estimate: float = 1.0, overlap: bool = False) -> SimResult:
    """Simulate ``plan`` under ``kv_budget`` tokens of KV.

    ``outputs``: each row's true output length (default: its max_tokens). ``overlap``: steps go as in the
    engine's overlapped loop (``engine.batch``: the next step is planned before this one's tokens are read
    back), so rows hold their KV one step longer."""
    cfg = plan.config
    max_tokens = np.asarray(plan.max_tokens, dtype=np.int64)
    target = max_tokens if outputs is None else np.clip(np.asarray(outputs, dtype=np.int64), 1, max_tokens)
    requests = [Request(key=i, prompt_ids=plan.tokens.row(i), max_tokens=int(max_tokens[i]))
                for i in range(plan.num_rows)]
    kv = KVManager(plan.prefixes, kv_budget // cfg.block_size, cfg.block_size)
    sched = Scheduler(plan, requests, kv, cfg.step_tokens, [_EOS], initial_estimate)
    made = np.zeros(plan.num_rows, dtype=np.int64)
    prefill = decode = peak = done = launches = 0
    too_big: list[int] = []
    inflight = None
    while True:
        step = None if sched.finished() else sched.next_step()
        if step is None and inflight is None:
            break
        peak = max(peak, kv.used_tokens)
        launched = None
        if step is not None and step.seqs:
            for w in step.seqs:
                if w.decode:
                    decode += 1
                else:
                    prefill += len(w.tokens)
            tokens = []
            for key in step.sample_keys:
                made[key.row] += 1
                tokens.append(_EOS if made[key.row] > target[key.row] else 0)
            sched.launched(step)
            launched, launches = (step, tokens), launches + 1
        resolving = [launched] if launched is not None and not overlap else []
        if inflight is not None:
            resolving.insert(0, inflight)
        errors = [] if resolving else [req.key for req, _ in sched.take_errors()]
        for s, tokens in resolving:
            ended = [e.key for e in sched.resolve(s, tokens) if e.ended]
            errors += [req.key for req, _ in sched.take_errors()]
            for key in ended:
                sched.finish(key)
            done += len(ended)
        too_big += errors
        inflight = launched if overlap else None
        if launched is None and not resolving and not errors:
            break  # nothing can run any more
    steps = launches if overlap else sched.steps
    return SimResult(steps, prefill, decode, peak, sched.preemptions, done, sorted(too_big))
