"""A step's token masks, computed on the CPU while the device works (``constraints.StepMasks`` does the work).

A row that goes on decoding has its next mask started as soon as its token is recorded (``start``, at the end
of the step before), so the grammar work runs while the scheduler plans the next step and the device runs
it. The rows a step adds (prompts whose prefill just ended), and rows with cheap constraints, are done when
the step is launched (``launch``). ``Masks.wait`` gives the step's masks in sampling order, packed in
page-locked memory (their copy to the device then waits for nothing). All grammar work runs in one worker
thread, in submission order, so a grammar is never touched by two jobs at once.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from batchrun.engine.constraints import Grammar, StepMasks, narrow

_WORKER: list[ThreadPoolExecutor] = []  # one thread running the grammar work while the GPU runs a step


def worker() -> ThreadPoolExecutor:
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="batchrun-masks"))
    return _WORKER[0]


@dataclass
class _Job:
    rows: dict[Hashable, int]  # key -> the row of ``job.out`` with its mask
    job: StepMasks
    done: Future


class MaskPipeline:
    """The masks of one engine run's steps (``vocab``: the logits' width; ``pin``: page-locked buffers)."""

    def __init__(self, vocab: int, pin: bool):
        self.words = (vocab + 31) // 32
        self.pin = pin
        self._early: _Job | None = None

    def start(self, keys: Sequence[Hashable], constraints: Sequence[Any],
              generated: Sequence[Sequence[int]]) -> None:
        """Start the next masks of rows that go on decoding (those with a grammar; the others are cheap)."""
        picked = [i for i, c in enumerate(constraints) if isinstance(c, Grammar)]
        if picked:
            self._early = self._submit([keys[i] for i in picked], [constraints[i] for i in picked],
                                       [generated[i] for i in picked])

    def launch(self, keys: Sequence[Hashable], constraints: Sequence[Any],
               generated: Sequence[Sequence[int]]) -> Masks:
        """The masks of a step about to launch: those started early, and the rest now (in the worker)."""
        early, self._early = self._early, None
        if early is not None:
            have = early.rows
            late = [i for i, k in enumerate(keys) if k not in have]
        else:
            late = list(range(len(keys)))
        jobs = [early] if early is not None else []
        if late:
            jobs.append(self._submit([keys[i] for i in late], [constraints[i] for i in late],
                                     [generated[i] for i in late]))
        return Masks(list(keys), jobs, self.words, self.pin)

    def _submit(self, keys: Sequence[Hashable], constraints: Sequence[Any],
                generated: Sequence[Sequence[int]]) -> _Job:
        job = StepMasks(constraints, generated, np.empty((len(keys), self.words), dtype=np.int32))
        return _Job({k: i for i, k in enumerate(keys)}, job, worker().submit(job.compute))


class Masks:
    """A launched step's masks on their way."""

    def __init__(self, keys: list[Hashable], jobs: list[_Job], words: int, pin: bool):
        self.keys, self.jobs, self.words, self.pin = keys, jobs, words, pin

    def wait(self) -> tuple[torch.Tensor, Future | None, float]:
        """(The masks [len(keys), words] int32 in sampling order, on the host; the forced runs' lookup, started
        in the worker; the seconds waited.) A row computed early but not in this step (preempted) keeps its
        grammar caught up: its next mask is computed when it comes back."""
        t = time.perf_counter()
        for j in self.jobs:
            j.done.result()
        waited = time.perf_counter() - t
        packed = torch.empty((len(self.keys), self.words), dtype=torch.int32, pin_memory=self.pin)
        out = packed.numpy()
        for j in self.jobs:
            at = [i for i, k in enumerate(self.keys) if k in j.rows]
            src = [j.rows[self.keys[i]] for i in at]
            if len(at) == len(self.keys) == len(j.job.out) and src == at:  # (one job, in order: most steps)
                out[:] = j.job.out
            elif at:
                out[at] = j.job.out[src]
        later = [x for j in self.jobs for x in j.job.later]
        return packed, worker().submit(narrow, later) if later else None, waited
