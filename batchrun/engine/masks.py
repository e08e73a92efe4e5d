"""A step's token masks, computed on the CPU while the device works (``grammar_pool.StepMasks`` does the work).

A worker thread does a step's grammar work, from the moment the rows' tokens of the step before are
recorded (``start``), in llguidance's thread pool, without the GIL, while the launching thread plans the step
and launches its forward pass (on a GPU) or the forward pass computes (on the CPU, also without the GIL). The
worker makes only llguidance's calls (``StepMasks.take_and_mask``); what needs Python around them
(``StepMasks.finish``, the forced-run lookup) is done on the launching thread. On a GPU the steps of a small
model are bound by the host (the launching thread's Python), so for the worker not to slow it
(``launching``): the GIL is handed over every ``SWITCH_S`` instead of every 5 ms, so that each of the worker's
calls starts at once instead of waiting out the launching thread's turn, and the launching thread keeps to
the CPUs the pool leaves it. On the H200 (SmolLM2, 960 rows) the masks then added 5% to 13% to the large
steps from process to process, against 16% to 19% with the grammar work on the launching thread after the
launch in the same processes (``benchmarks/results/constraint-h200.jsonl``; the machine's CPUs move the
figure more than the masks do; with one torch CPU thread and the shared masks gathered on the device, +2.8%
to +10.0% at 256 to 960 rows in three processes). ``BATCHRUN_MASK_WORKER``: 1,
the worker (the default); 0, the launching thread, once the forward pass is launched. ``Masks.wait`` gives
the step's masks in sampling order, packed in page-locked memory (their copy to the device then waits for
nothing).

Greedy runs skip the expensive masks. A mask that allows much of the vocabulary (free text inside a string)
costs the most (hundreds of microseconds with a bounded string, against tens elsewhere), and there the
model's own best token is nearly always allowed. So a row whose last mask allowed at least ``LAZY_SHARE`` of
the vocabulary is drawn without a mask, and ``Masks.settle`` then asks its grammar whether the token is
allowed (microseconds). If it is, it is exactly the token the mask would have given: masking only removes
tokens, and the argmax is the first best one either way. If not, the row's mask is computed there and its
token drawn again from the masked logits. The rows' checks run together in llguidance's pool. A refused token
costs more than its mask would have (the mask computed while the step waits, and a grammar restarted), so a
constraint draws before its masks only while at least ``LAZY_MIN_ALLOWED`` of such tokens are allowed (judged
after ``LAZY_TRIAL`` of them; a real model's best token inside free text nearly always is, a random model's
about half the time). Only where the forward pass runs on the CPU, by default: on a GPU the masks are computed
in llguidance's pool while the device runs the step, but a row drawn before its mask is checked after the step,
on the launching thread, and on the H200 computing every mask added less to the steps in nine of ten paired
runs of the example, the tenth a tie (``benchmarks/results/constraint-h200.jsonl``). ``BATCHRUN_LAZY_MASKS``: 1, also on
a GPU; 0, never (``draws_before_masks``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from batchrun.engine.constraints import Grammar
from batchrun.engine.grammar_pool import StepMasks, consume_drawn, launcher_cpus, narrow
from batchrun.engine.held import WhileRuns
from batchrun.engine.sampling import apply_mask_bits
from batchrun.errors import RuntimeFailure

LAZY_SHARE = 0.25  # a grammar whose last mask allowed this share of the vocabulary is checked after the draw
LAZY_TRIAL = 256  # tokens drawn before their masks, per constraint, before judging whether that pays
LAZY_MIN_ALLOWED = 0.9  # the share of them that must be allowed for it to go on
SWITCH_S = 0.0002  # the GIL's switch interval in a GPU run with the mask worker (Python's own: 5 ms)
T = TypeVar("T")
_WORKER: list[ThreadPoolExecutor] = []  # (BATCHRUN_MASK_WORKER=1: one thread doing the grammar work)


def worker() -> ThreadPoolExecutor:
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="batchrun-masks"))
    return _WORKER[0]


class Later:
    """Work done when its result is first asked for, on the asking thread (a Future's ``result`` without a
    worker thread)."""

    def __init__(self, fn, *args):
        self._call: tuple | None = (fn, args)

    def result(self) -> None:
        if self._call is not None:
            fn, args = self._call
            self._call = None
            fn(*args)


def uses_pool(constraints: Iterable[Any]) -> bool:
    """Does a run with these constraints do grammar work (masks from llguidance's pool), and so want its steps
    made under ``MaskPipeline.launching``? Not with only BatchPrompt's label slots or none: their masks are a
    few ids, packed on the launching thread."""
    return any(isinstance(c, Grammar) for c in constraints)


def in_worker() -> bool:
    """Is the grammar work done in the worker thread (the default), overlapping the launches or the CPU's forward
    pass? ``BATCHRUN_MASK_WORKER=0``: on the launching thread, once the step's forward pass is launched."""
    return os.environ.get("BATCHRUN_MASK_WORKER", "1") == "1"


def _run(threaded: bool, fn, *args) -> Any:
    """``fn(*args)``: in the worker thread, or (``threaded`` False) when its result is asked for."""
    return worker().submit(fn, *args) if threaded else Later(fn, *args)


@dataclass
class _Job:
    rows: dict[Hashable, int]  # key -> the row of ``job.out`` with its mask
    job: StepMasks
    done: Future | Later
    packed: torch.Tensor  # (``job.out``'s tensor: page-locked on a GPU)
    whole: bool = False  # (``packed`` is the step's masks as they are: every row, in sampling order)


class MaskPipeline:
    """The masks of one engine run's steps (``vocab``: the logits' width; ``pin``: page-locked buffers;
    ``greedy``: every row greedy, so wide masks may be checked after the draw instead)."""

    def __init__(self, vocab: int, pin: bool, greedy: bool):
        self.words = (vocab + 31) // 32
        self.pin = pin
        self.lazy_width = vocab * LAZY_SHARE if greedy and draws_before_masks(pin) else float("inf")
        self.threaded = in_worker()
        self._early: _Job | None = None
        self._lazy: set[Hashable] = set()

    def launching(self, steps: Iterator[T]) -> Iterator[T]:
        """``steps`` (a GPU run's, with constraints), each made with the thread that launches it kept off the
        CPUs of llguidance's pool (when the pool keeps to half of them: ``grammar_pool._pool``; the code
        that takes each step's output runs where it ran before), and with the mask worker, the GIL handed over
        every ``SWITCH_S`` instead of every 5 ms for the whole run, so that the worker's calls into the pool
        start at once instead of waiting out the launching thread's turn. ``BATCHRUN_LAUNCHER_CPUS=all`` and
        ``BATCHRUN_MASK_SWITCH_S`` (seconds) change them. The mask worker's thread is made first, so that it
        does not keep the CPUs of the step that first uses it."""
        if not self.pin:
            yield from steps
            return
        if self.threaded:
            worker().submit(int).result()  # (a no-op: the executor makes its thread at the first call)
        cpus = launcher_cpus() if os.environ.get("BATCHRUN_LAUNCHER_CPUS", "other") != "all" else []
        before = sorted(os.sched_getaffinity(0)) if cpus else []
        with _switch_interval(self.threaded):
            while True:
                pinned = bool(cpus) and _keep_to(cpus)
                try:
                    out = next(steps)
                except StopIteration:
                    return
                finally:
                    if pinned:
                        _keep_to(before)
                yield out

    def start(self, keys: Sequence[Hashable], constraints: Sequence[Any],
              generated: Sequence[Sequence[int]]) -> None:
        """The rows that go on decoding (those with a grammar; the others are cheap): a row whose last mask was
        wide is brought up to date and left for ``Masks.settle``; the others' next masks start in the worker
        thread (``threaded``), or are computed with the step's other rows (``launch``)."""
        if self._early is not None:  # (lined up for a step that never came: every row preempted)
            self._early.done.result()
            self._early.job.finish()
        picked = []
        self._lazy = set()
        width = self.lazy_width
        pays: dict[int, bool] = {}  # (per compiled constraint, judged once a step)
        for i, c in enumerate(constraints):
            if not isinstance(c, Grammar):
                continue
            if c.width >= width:
                ok = pays.get(id(c.compiled))
                if ok is None:
                    ok = pays[id(c.compiled)] = _pays(c.compiled.stats)
                if ok and c.skips_mask(generated[i], width):
                    self._lazy.add(keys[i])
                    continue
            picked.append(i)
        if picked and self.threaded:  # (else the grammar work is lined up with the step's other rows: ``launch``)
            if len(picked) == len(keys):  # (every row: the common case)
                self._early = self._submit(keys, constraints, generated)
            else:
                self._early = self._submit([keys[i] for i in picked], [constraints[i] for i in picked],
                                           [generated[i] for i in picked])

    def launch(self, keys: Sequence[Hashable], constraints: Sequence[Any],
               generated: Sequence[Sequence[int]]) -> Masks:
        """The masks of a step about to launch: those lined up at the step before, and the rest."""
        early, self._early = self._early, None
        lazy_keys, self._lazy = self._lazy, set()
        if early is None and not self.threaded:  # (one job over the step's rows, written where the copy reads)
            packed = torch.empty((len(keys), self.words), dtype=torch.int32, pin_memory=self.pin)
            job = StepMasks([None if k in lazy_keys else c for k, c in zip(keys, constraints)], generated,
                            packed.numpy())
            lazy = [(i, constraints[i], generated[i]) for i, k in enumerate(keys) if k in lazy_keys]
            return Masks(list(keys), [_Job({}, job, Later(job.take_and_mask), packed, whole=True)], self.words,
                         self.pin, lazy, False)  # (``Masks.wait`` finishes it; shared masks gathered on the device)
        have = early.rows if early is not None else {}
        lazy = [i for i, k in enumerate(keys) if k in lazy_keys]
        late = [i for i, k in enumerate(keys) if k not in have and k not in lazy_keys]
        jobs = [early] if early is not None else []
        if late:
            jobs.append(self._submit([keys[i] for i in late], [constraints[i] for i in late],
                                     [generated[i] for i in late]))
        return Masks(list(keys), jobs, self.words, self.pin, [(i, constraints[i], generated[i]) for i in lazy],
                     self.threaded)

    def _submit(self, keys: Sequence[Hashable], constraints: Sequence[Any],
                generated: Sequence[Sequence[int]]) -> _Job:
        packed = torch.empty((len(keys), self.words), dtype=torch.int32, pin_memory=self.pin)
        job = StepMasks(constraints, generated, packed.numpy())
        return _Job(dict(zip(keys, range(len(keys)))), job, _run(self.threaded, job.take_and_mask), packed)


class Masks:
    """A launched step's masks on their way."""

    def __init__(self, keys: list[Hashable], jobs: list[_Job], words: int, pin: bool,
                 lazy: list[tuple[int, Grammar, Sequence[int]]], threaded: bool):
        self.keys, self.jobs, self.words, self.pin, self.threaded = keys, jobs, words, pin, threaded
        self.lazy = lazy  # (position, grammar, generated) of the rows drawn without a mask

    def wait(self) -> tuple[torch.Tensor, torch.Tensor | None, Future | Later | None, float]:
        """(The masks [m, words] int32 on the host; which of them each row has, in sampling order ([len(keys)]
        int64 on the host, page-locked on a GPU; None: row i has mask i); the forced runs' lookup, done when its
        result is asked for; the seconds the grammar work took or was waited for.) ``apply_mask_bits`` takes
        the first two. A row lined up early but not in this step (preempted) keeps its grammar caught up: its
        next mask is computed when it comes back."""
        t = time.perf_counter()
        for j in self.jobs:
            j.done.result()
            j.job.finish()
        waited = time.perf_counter() - t
        lone = self.jobs[0] if len(self.jobs) == 1 else None
        if lone is not None and (lone.whole or (not self.lazy and list(lone.rows) == self.keys)):  # (most steps)
            shared = lone.job.shared_rows()
            rows = None if shared is None else torch.from_numpy(shared)
            return lone.packed, rows.pin_memory() if rows is not None and self.pin else rows, \
                _forced(lone.job.later), waited
        packed = torch.empty((len(self.keys), self.words), dtype=torch.int32, pin_memory=self.pin)
        out = packed.numpy()
        for i, _, _ in self.lazy:
            out[i] = -1
        for j in self.jobs:
            j.job.fill_shared()
            at = [i for i, k in enumerate(self.keys) if k in j.rows]
            src = [j.rows[self.keys[i]] for i in at]
            if len(at) == len(self.keys) == len(j.job.out) and src == at:  # (one job, in order: most steps)
                out[:] = j.job.out
            elif at:
                out[at] = j.job.out[src]
        return packed, None, _forced([x for j in self.jobs for x in j.job.later]), waited

    def settle(self, tokens: list[int], logits: torch.Tensor) -> None:
        """Check the tokens of the rows drawn without a mask (``tokens``: the step's, in sampling order;
        ``logits``: the step's, on the device). A token its grammar allows stays (and is consumed); the others
        are drawn again from their rows' masked logits, their masks computed now."""
        if not self.lazy:
            return
        grammars = [g for _, g, _ in self.lazy]
        allowed = consume_drawn(grammars, [tokens[i] for i, _, _ in self.lazy])
        counts: dict[int, list] = {}  # (the job's report: rows drawn without their mask, and how many stayed)
        if all(g.compiled is grammars[0].compiled for g in grammars):  # (one constraint: most jobs)
            counts[0] = [grammars[0].compiled.stats, len(allowed), sum(allowed)]
        else:
            for g, ok in zip(grammars, allowed):
                c = counts.setdefault(id(g.compiled), [g.compiled.stats, 0, 0])
                c[1] += 1
                c[2] += ok
        for stats, n, ok in counts.values():
            stats["unmasked"] = stats.get("unmasked", 0) + n
            stats["unmasked_allowed"] = stats.get("unmasked_allowed", 0) + ok
        failed = [x for x, ok in zip(self.lazy, allowed) if not ok]
        if not failed:
            return
        job = StepMasks([g for _, g, _ in failed], [gen for _, _, gen in failed],
                        np.empty((len(failed), self.words), dtype=np.int32))
        job.compute()
        narrow(job.later)
        rows = [i for i, _, _ in failed]
        redrawn = apply_mask_bits(logits[rows], torch.from_numpy(job.out)).argmax(-1).tolist()
        for i, t in zip(rows, redrawn):
            tokens[i] = t


def _keep_to(cpus: list[int]) -> bool:
    """This thread kept to ``cpus``; False (left as it is) if it may not use them."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return False
    return True


_SWITCHED = WhileRuns()  # (GPU runs with the mask worker going in this process)


@contextmanager
def _switch_interval(threaded: bool) -> Iterator[None]:
    """The GIL's switch interval at ``SWITCH_S`` (``BATCHRUN_MASK_SWITCH_S``) while the mask worker runs
    (``threaded``), put back when the last such run of the process ends (``engine.held``)."""
    if not threaded:
        yield
        return
    raw = os.environ.get("BATCHRUN_MASK_SWITCH_S", str(SWITCH_S))
    try:
        switch = float(raw)
        if not switch > 0:
            raise ValueError
    except ValueError:
        raise RuntimeFailure(f"BATCHRUN_MASK_SWITCH_S={raw!r}: expected a number of seconds above 0, such as "
                             f"{SWITCH_S}") from None

    def make() -> Callable[[], None]:
        before = sys.getswitchinterval()
        sys.setswitchinterval(switch)
        return lambda: sys.setswitchinterval(before)

    with _SWITCHED.held(make):
        yield


def _forced(later: list) -> Later | None:
    """The step's forced-run lookup (``narrow``), done on the launching thread when its result is asked for."""
    return Later(narrow, later) if later else None


def _pays(stats: dict) -> bool:
    """Does drawing before the mask pay for this constraint (``stats``: its compiled grammar's)?"""
    n = stats.get("unmasked", 0)
    return n < LAZY_TRIAL or stats.get("unmasked_allowed", 0) >= LAZY_MIN_ALLOWED * n


def draws_before_masks(pin: bool) -> bool:
    """Are greedy rows inside free text drawn before their masks? By default only on the CPU (``pin`` False: no
    GPU); ``BATCHRUN_LAZY_MASKS``: 1, also on a GPU; 0, never."""
    mode = os.environ.get("BATCHRUN_LAZY_MASKS", "auto")
    return mode == "1" or (mode != "0" and not pin)
