"""Timing batchrun's engine from outside, for the benchmarks (``constraint_gpu.py``): the host time of each phase
of a step (``time_phases``: planning, launching the forward pass, the masks' work and waits, recording the
tokens, the garbage collector's pauses), each step's time with its batch (``time_steps``, ``step_shares``),
and the main thread alone on one CPU (``pin_main``, an experiment). The engine's methods are wrapped in
place, once per process.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PHASES: dict[str, float] = {}
STEPS: list[tuple[int, float, bool, dict]] = []  # (sampled rows, seconds, replayed from a CUDA graph, the
# phases' host time in it (with ``time_phases``) and its tokens under "tokens") of each step
_STEP_START = [0.0]
_PHASES_AT: list[dict[str, float]] = [{}]  # PHASES when the last step began
_GRAPHS: dict[int, int] = {}  # id(engine) -> its runner's graph replays so far


def time_steps() -> None:
    """Time each step of a run that launches one step at a time (a constrained run and its replay): from the
    scheduler's planning it to its tokens recorded, with the number of rows it samples (``STEPS``)."""
    import batchrun.engine.batch as batch
    import batchrun.engine.scheduler as scheduler

    plan, resolve = scheduler.Scheduler.next_step, batch.BatchEngine._resolve

    def planned(self, *a, **k):
        _STEP_START[0] = time.perf_counter()
        _PHASES_AT[0] = dict(PHASES)
        return plan(self, *a, **k)

    def resolved(self, launched, run):
        try:
            return resolve(self, launched, run)
        finally:
            graphs = self.runner.graph_steps
            at = _PHASES_AT[0]
            STEPS.append((len(launched.step.sample_keys), time.perf_counter() - _STEP_START[0],
                          graphs > _GRAPHS.get(id(self), 0),
                          {k: v - at.get(k, 0.0) for k, v in PHASES.items()} | {"tokens": launched.step.num_tokens}))
            _GRAPHS[id(self)] = graphs

    scheduler.Scheduler.next_step, batch.BatchEngine._resolve = planned, resolved


def step_shares(steps: dict[str, list[list[tuple]]], batch: int) -> dict:
    """What grammar work adds to the steps sampling at least ``batch`` rows: each step's fastest time over the
    repeats (the runs of a kind have the same steps), summed over those steps, against the replay's; split
    into the steps replayed from a graph and the eager ones, by phase (``phases_added_s``, with
    ``time_phases``), and the steps that add the most (``worst_steps``); ``run_shares``: each repeat's own
    share against the replay's repeat of the same number (interleaved, so run at nearly the same time), and
    their median (``run_share_median``)."""
    def fastest(runs):  # (each step's fastest run, with that run's phases in the step)
        return [min((r[i] for r in runs), key=lambda s: s[1]) for i in range(len(runs[0]))]

    def phases(steps):
        out: dict[str, float] = {}
        for n, _, _, ph in steps:
            if n >= batch:
                for k, v in ph.items():
                    if k != "tokens":
                        out[k] = out.get(k, 0.0) + v
        return out

    def worst(mine, replay, top=6):  # (the steps that add the most, each with its phases against the replay's)
        added = sorted(((s - r, i) for i, ((n, s, _, _), (_, r, _, _)) in enumerate(zip(mine, replay)) if n >= batch),
                       reverse=True)[:top]
        out = []
        for a, i in added:
            (n, _, g, ph), (_, r, _, base_ph) = mine[i], replay[i]
            deltas = {k: round(1000 * (ph.get(k, 0.0) - base_ph.get(k, 0.0)), 2) for k in set(ph) | set(base_ph)
                      if k != "tokens" and abs(ph.get(k, 0.0) - base_ph.get(k, 0.0)) >= 5e-4}
            out.append({"step": i, "rows": n, "tokens": ph.get("tokens"), "graph": g, "replay_ms": round(1000 * r, 2),
                        "added_ms": round(1000 * a, 2), "phases_added_ms": dict(sorted(deltas.items()))})
        return out

    def paired(runs, replays):  # (each repeat against the replay's same repeat: how much the figure moves)
        large = [sum(s for n, s, _, _ in run if n >= batch) for run in runs]
        base = [sum(s for n, s, _, _ in run if n >= batch) for run in replays]
        return [round((a - b) / b, 4) if b else None for a, b in zip(large, base)]

    out = {}
    replay = fastest(steps["replay"])
    base = sum(s for n, s, _, _ in replay if n >= batch)
    base_phases = phases(replay)
    for kind in steps:
        if kind == "replay":
            continue
        mine = fastest(steps[kind])
        if [n for n, *_ in mine] != [n for n, *_ in replay]:
            continue
        added = sum(s for n, s, _, _ in mine if n >= batch) - base
        out[kind] = {"steps": sum(n >= batch for n, *_ in mine), "replay_s": round(base, 4),
                     "added_s": round(added, 4), "added_share": round(added / base, 4) if base else None,
                     "run_shares": paired(steps[kind], steps["replay"])}
        out[kind]["run_share_median"] = share_median(out[kind]["run_shares"])
        for graph in (True, False):  # (the same split over the steps replayed from a graph, and the eager ones)
            pairs = [(s, r) for (n, s, _, _), (_, r, g, _) in zip(mine, replay) if n >= batch and g == graph]
            out[kind]["graph" if graph else "eager"] = {
                "steps": len(pairs), "replay_s": round(sum(r for _, r in pairs), 4),
                "added_s": round(sum(s - r for s, r in pairs), 4)}
        if base_phases or phases(mine):  # (where the added time went: each phase against the replay's)
            ph = phases(mine)
            out[kind]["phases_added_s"] = {k: round(ph.get(k, 0.0) - base_phases.get(k, 0.0), 4)
                                           for k in sorted(set(ph) | set(base_phases))}
        out[kind]["worst_steps"] = worst(mine, replay)
    return out


def share_median(shares: list) -> float | None:
    """The median of the per-repeat figures (``run_shares``), None where there are none."""
    known = [x for x in shares if x is not None]
    return round(statistics.median(known), 4) if known else None


def time_phases() -> None:
    """Wrap the engine's phases to add up their host time per run (``--phases``): planning the step, the
    forward's launch, waiting for the masks, applying them, reading back and recording the tokens, and the
    grammar work in the worker thread."""
    import batchrun.engine.batch as batch
    import batchrun.engine.grammar_pool as grammar_pool
    import batchrun.engine.masks as masks
    import batchrun.engine.runner as runner
    import batchrun.engine.scheduler as scheduler

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                PHASES[label] = PHASES.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)

    wrap(scheduler.Scheduler, "next_step", "plan_step")
    wrap(runner.Runner, "forward", "launch_forward")
    wrap(batch, "apply_mask_bits", "apply_masks")
    wrap(grammar_pool.StepMasks, "compute", "worker_masks")
    wrap(grammar_pool.StepMasks, "take_and_mask", "pool_masks")  # (the part the mask worker runs)
    wrap(grammar_pool.StepMasks, "finish", "finish_masks")
    wrap(grammar_pool.StepMasks, "__init__", "prepare_masks")
    wrap(masks, "narrow", "worker_narrow")
    wrap(batch.BatchEngine, "_resolve", "resolve")
    wrap(masks.Masks, "wait", "wait_masks")
    wrap(masks.Masks, "settle", "settle_drawn")
    wrap(masks, "consume_drawn", "settle_take")
    wrap(masks.MaskPipeline, "start", "start_masks")
    gc.callbacks.append(_pause_timer(_pause_phases))


def _pause_timer(add: Callable[[float, bool], None]) -> Callable[[str, dict], None]:
    """A ``gc.callbacks`` entry that calls ``add(seconds, full)`` after each of the garbage collector's pauses
    (``full``: a collection of the oldest generation, which ``engine.collector`` keeps short)."""
    began = [0.0]

    def pause(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            add(time.perf_counter() - began[0], info.get("generation") == 2)

    return pause


def _pause_phases(took: float, full: bool) -> None:
    """The collector's pauses as phases: ``gc`` (every collection) and ``gc_full``."""
    PHASES["gc"] = PHASES.get("gc", 0.0) + took
    if full:
        PHASES["gc_full"] = PHASES.get("gc_full", 0.0) + took


@contextmanager
def gc_pauses() -> Iterator[dict]:
    """The garbage collector's pauses while the block runs (any thread): ``gc_s`` (every collection),
    ``gc_full_s`` and ``gc_full`` (the oldest generation's: their seconds and number)."""
    out = {"gc_s": 0.0, "gc_full_s": 0.0, "gc_full": 0}

    def add(took: float, full: bool) -> None:
        out["gc_s"] += took
        if full:
            out["gc_full_s"] += took
            out["gc_full"] += 1

    pause = _pause_timer(add)
    gc.callbacks.append(pause)
    try:
        yield out
    finally:
        gc.callbacks.remove(pause)
        out["gc_s"], out["gc_full_s"] = round(out["gc_s"], 4), round(out["gc_full_s"], 4)


def pin_main(where: str = "first") -> None:
    """An experiment. ``first`` (rejected: every run 3-6x slower): the grammar threads (the mask worker and
    llguidance's pool, made now, inheriting this affinity) on every CPU but the first, then the main thread
    alone on the first. ``lower``: llguidance's pool made as the engine makes it (on the upper half of the
    CPUs), then the main thread (and the threads it makes later: the mask worker) on the lower half, so that
    the thread launching the steps never shares a CPU with the pool."""
    import batchrun.engine.grammar_pool as grammar_pool
    import batchrun.engine.masks as masks

    cpus = sorted(os.sched_getaffinity(0))
    if where == "lower":
        grammar_pool._executor()
        os.sched_setaffinity(0, cpus[: len(cpus) // 2])
        return
    os.sched_setaffinity(0, cpus[1:])
    masks.worker().submit(grammar_pool._executor).result()
    os.sched_setaffinity(0, cpus[:1])


def grammar_load(compiled, kind: str, rows: int = 256):
    """A diagnostic: grammar work with no engine step behind it, run while a replay runs, to tell what slows the
    launches of a constrained run. ``kind`` "thread": a thread of this process computing ``rows`` masks inside
    free text in llguidance's pool, again and again (the GIL handed back and forth as the mask worker does);
    "process": the same in a child process on the pool's CPUs (only the CPUs shared). Returns stop()."""
    import multiprocessing
    import threading

    stop = multiprocessing.Event() if kind == "process" else threading.Event()
    if kind == "process":
        child = multiprocessing.get_context("fork").Process(target=_load_loop, args=(compiled, rows, stop, True))
        child.start()
        return lambda: (stop.set(), child.join())
    thread = threading.Thread(target=_load_loop, args=(compiled, rows, stop, False), daemon=True)
    thread.start()
    return lambda: (stop.set(), thread.join())


def _load_loop(compiled, rows, stop, own_pool: bool) -> None:
    import numpy as np
    from llguidance import LLExecutor

    from batchrun.engine import grammar_pool

    if own_pool:  # (a forked child: the upper half of the CPUs, like the engine's pool)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= grammar_pool.POOL_SPLIT_MIN:
            os.sched_setaffinity(0, cpus[len(cpus) // 2 :])
        pool = LLExecutor()
    else:
        pool = grammar_pool._executor()
    text = compiled.tokenizer.tokenize_str('{"product": "a phone case that is nice and')
    matchers = []
    for _ in range(rows):
        g = compiled.new()
        g._matcher.try_consume_tokens(text)
        matchers.append(g._matcher)
    words = (compiled.tokenizer.vocab_size + 31) // 32
    out = np.zeros((rows, words), dtype=np.int32)
    pairs = [(m, i) for i, m in enumerate(matchers)]
    while not stop.is_set():
        pool.unsafe_compute_mask_ptr(pairs, out.ctypes.data, words * 4, rows)
