"""The worker side of a job with several devices: one model on one device, running the shards it is given.

A ``ShardWorker`` prepares the job exactly as the driver did (same input, same prompts, same requests: the
preparation is deterministic), loads the weights on its device once, and then runs shard after shard: the
requests whose keys the driver sends, planned again over just those rows (their prefixes are the shard's, so
each shared prefix is computed once per shard). It yields finished completions; it writes nothing. Both pools
run it: worker processes on this host (``runtime/local_pool.py``) and Ray actors (``runtime/ray_pool.py``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from batchrun.engine.requests import Completion
from batchrun.runtime.prepare import PreparedJob, plan_requests, prepare
from batchrun.spec import JobSpec

# A test hook (a fail point): the worker running shard N for the first time kills itself (SIGKILL) right
# after it has handed over its first finished rows. Tests use it to check that a lost worker's shard is rerun
# by another worker, every row written exactly once.
FAILPOINT = "BATCHRUN_FAILPOINT_KILL_WORKER_AT_SHARD"


# What a pool reports to the driver (``runtime/distribute.py``): a worker is ready, a shard's finished rows,
# a shard done, a worker lost.


@dataclass(frozen=True)
class Ready:
    worker: int
    info: dict[str, Any]  # device, dtype, load and prepare time, pid


@dataclass(frozen=True)
class Rows:
    worker: int
    shard: int
    completions: list[Completion]


@dataclass(frozen=True)
class Lost:
    """A worker that died or failed: its shard in flight (if any) is rerun by another."""

    worker: int
    why: str


@dataclass(frozen=True)
class ShardDone:
    """A shard finished (or stopped: ``stopped``), with what its run measured."""

    worker: int
    shard: int
    stopped: bool
    busy_s: float  # time running the shard's requests
    kv_budget_tokens: int | None
    kv_peak_tokens: int | None


def worker_spec(spec: JobSpec, device: str, threads: int | None) -> JobSpec:
    """The job as one worker runs it: one device, no more workers."""
    engine = spec.engine.model_copy(update={"device": device, "devices": None, "executor": "local",
                                            "ray_address": None, "threads": spec.engine.threads or threads})
    return spec.model_copy(update={"engine": engine})


class ShardWorker:
    """Prepare ``spec`` (skipping the input rows whose ids are in ``done``) and load its model on ``device``."""

    def __init__(self, spec: JobSpec, device: str, done: Collection[Any] = frozenset(), threads: int | None = None,
                 share: int = 1):
        """``share``: the workers on this device (each then takes its part of the GPU for its KV cache)."""
        from batchrun.engine import loader
        from batchrun.engine.factory import make_engine, shared_kv_budget

        t = time.monotonic()
        spec = worker_spec(spec, device, threads)
        resolved = loader.resolve(spec.model)
        tokenizer = loader.load_tokenizer(spec.model, resolved)
        facts = loader.model_facts(spec.model, spec.engine, resolved, tokenizer=tokenizer)
        with ThreadPoolExecutor(1) as background:  # the weights load while the job is prepared
            loading = background.submit(self._load, spec, tokenizer)
            self.prepared: PreparedJob = prepare(spec, tokenizer, facts.max_context, done)
            self.prepare_s = time.monotonic() - t
            self.loaded = loading.result()
        self.spec = self.prepared.spec or spec
        self.device = self.loaded.device
        budget = None if self.spec.engine.kv_budget_tokens else shared_kv_budget(self.loaded, share)
        if budget:
            self.spec = self.spec.model_copy(update={
                "engine": self.spec.engine.model_copy(update={"kv_budget_tokens": budget})})
        self.index = {r.key: i for i, r in enumerate(self.prepared.requests)}
        self.engine = make_engine(self.spec, self.loaded, self.prepared.requests) if self.prepared.requests else None
        self.score = choice_scorer(self.spec, self.loaded, self.prepared)

    def _load(self, spec: JobSpec, tokenizer: Any) -> Any:
        from batchrun.engine import loader

        t = time.monotonic()
        loaded = loader.load(spec.model, spec.engine, tokenizer)
        self.load_s = time.monotonic() - t
        return loaded

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.loaded.dtype, "resolved": self.loaded.resolved,
                "load_s": round(self.load_s, 3), "prepare_s": round(self.prepare_s, 3), "pid": os.getpid(),
                "input": input_stats(self.prepared)}

    def run(self, keys: Sequence[Hashable], interrupt: Callable[[], bool]) -> Iterator[list[Completion]]:
        """Run the requests of ``keys`` (a shard, or what is left of one); yield finished completions."""
        missing = [k for k in keys if k not in self.index]
        if missing:  # the driver and this worker prepared different jobs: never write wrong rows
            raise RuntimeError(f"{len(missing)} request(s) of the shard are not in this worker's job (first: "
                               f"{missing[0]!r}); did the input change while the job ran?")
        if not keys:
            return
        at = np.array(sorted(self.index[k] for k in keys), dtype=np.int64)
        requests = [self.prepared.requests[i] for i in at]
        plan = plan_requests(self.spec, self.prepared.prompts, requests, self.prepared.request_rows[at])
        for batch in self.engine.run(requests, plan, interrupt=interrupt):
            yield [self.score(c) for c in batch] if self.score else batch

    def events(self, index: int, shard: int, attempt: int, keys: Sequence[Hashable], stop: Callable[[], bool],
               before_dying: Callable[[], None] = lambda: None) -> Iterator[Rows | ShardDone]:
        """A shard's run as the driver hears of it (worker ``index``, its ``attempt``-th run): ``Rows`` as
        requests finish, then ``ShardDone``; ``stop`` ends it early (the ``FAILPOINT`` hook runs here too)."""
        t = time.monotonic()
        for batch in self.run(keys, interrupt=stop):
            yield Rows(index, shard, batch)
            failpoint(shard, attempt, before_dying)
        yield ShardDone(index, shard, stop(), time.monotonic() - t, *self.kv_usage())

    def kv_usage(self) -> tuple[int | None, int | None]:
        from batchrun.engine.factory import kv_usage

        return kv_usage(self.engine) if self.engine is not None else (None, None)


def input_stats(prepared: PreparedJob) -> list[tuple[str, int, int]]:
    """The input files a preparation read (path, size, modification time): driver and workers must agree."""
    return [(f.path, f.size, f.mtime_ns) for f in prepared.source.files]


def choice_scorer(spec: JobSpec, loaded: Any, prepared: PreparedJob) -> Callable[[Completion], Completion] | None:
    """With a ``choices`` constraint: a function that puts every choice's probability on a completion."""
    c = spec.sampling.constraint
    if c is None or c.kind != "choices" or loaded is None:
        return None
    from batchrun.engine.scoring import choice_probs

    requests = {r.key: r for r in prepared.requests}
    end = [] if spec.sampling.ignore_eos else list(loaded.eos_ids[:1])

    def score(done: Completion) -> Completion:
        if done.error:
            return done
        req = requests[done.key]
        return replace(done, choice_probs=choice_probs(loaded, req.prompt_ids, list(c.choices), end))

    return score


def failpoint(shard: int, attempt: int, before_dying: Callable[[], None] = lambda: None) -> None:
    """The test hook ``FAILPOINT``: SIGKILL this process if it runs shard ``shard`` for the first time."""
    target = os.environ.get(FAILPOINT)
    if target is not None and attempt == 0 and target == str(shard):
        before_dying()
        os.kill(os.getpid(), signal.SIGKILL)
