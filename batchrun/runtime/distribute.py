"""A job over several workers, one per device: the plan cut into shards, handed out as workers become free.

The driver (this process) keeps what makes a job whole: it holds the output's lock, prepares and plans the
job once, cuts the plan into shards along the prefix trie (``plan/shards.py``: no shared prefix computed
twice unless it is bigger than a fair share), and hands the shards out, largest first, each to the next free
worker. Workers (``ShardWorker`` in processes of this host, ``local_pool``, or Ray actors, ``ray_pool``) run
the engine and send back finished completions; the driver alone turns them into rows and writes them (parts
per shard), so a row is committed once, whoever computed it.

A worker that dies or fails is dropped; the rows of its shard that had not reached the driver are handed to
another worker (at most ``MAX_ATTEMPTS`` times a shard), so nothing is lost or written twice. A stop (SIGTERM,
Ctrl-C) reaches every worker: each ends its shard at the engine's next poll, the driver keeps every row it
received, and the job ends resumable (exit 75), as with one device.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchrun.errors import RuntimeFailure, SpecError
from batchrun.plan.shards import shard_plan
from batchrun.runtime.assemble import RowResult
from batchrun.runtime.prepare import PreparedJob
from batchrun.runtime.progress import Progress
from batchrun.runtime.shard_worker import Lost, Ready, Rows, ShardDone, input_stats
from batchrun.runtime.stop import StopFlag
from batchrun.spec import EngineSpec, JobSpec

log = logging.getLogger("batchrun")

MAX_ATTEMPTS = 3  # runs of one shard (its rows not yet received) before the job fails
POLL_S = 0.2


class Pool(Protocol):
    """Workers, one per device: local processes or Ray actors."""

    executor: str
    devices: list[str]

    started_at: float  # time.monotonic() at start

    def start(self) -> None: ...

    def assign(self, worker: int, shard: int, attempt: int, keys: list[Any]) -> None: ...

    def poll(self, timeout: float) -> list[Any]: ...  # Ready, Rows, ShardDone, Lost

    def stop(self) -> None: ...

    def close(self) -> None: ...


def several_workers(engine: EngineSpec) -> bool:
    """Does this job run on workers (``engine.devices`` with more than one device, or the Ray executor)?"""
    if engine.executor == "ray":
        return True
    return engine.devices is not None and len(local_devices(engine)) > 1


def local_devices(engine: EngineSpec) -> list[str]:
    """``engine.devices`` on this host: the list given, or (auto) every visible GPU, else the CPU."""
    if isinstance(engine.devices, list):
        return list(engine.devices)
    from batchrun.engine.loader import visible_devices

    return visible_devices()


def make_pool(spec: JobSpec, done: Collection[Any]) -> Pool:
    if spec.engine.executor == "ray":
        from batchrun.runtime.ray_pool import RayPool

        return RayPool(spec, done)
    from batchrun.runtime.local_pool import LocalPool

    return LocalPool(spec, local_devices(spec.engine), done)


@dataclass
class WorkerRecord:
    """What one worker did, for the manifest's ``workers``."""

    device: str
    state: str = "starting"  # starting, ready, lost
    shards: list[int] = field(default_factory=list)
    rows: int = 0
    busy_s: float = 0.0
    load_s: float | None = None
    ready_s: float | None = None  # from the pool's start to this worker's model loaded (start-up, prepare, load)
    done_s: float | None = None  # from the pool's start to this worker's last shard done
    lost: str | None = None


@dataclass
class Distributed:
    """The outcome of ``run_shards``: the manifest's ``workers`` section and the figures the job reports."""

    report: dict[str, Any]
    kv_budget_tokens: int | None
    kv_peak_tokens: int | None
    load_s: float
    stopped: bool


def run_shards(spec: JobSpec, prepared: PreparedJob, pool: Pool, emit: Callable[[list[RowResult], int], None],
               progress: Progress, stop: StopFlag) -> Distributed:
    """Run ``prepared``'s requests on ``pool``'s workers (started by the caller, who also closes it: the
    workers load while the job is prepared), shard by shard; ``emit(rows, shard)`` each finished row.
    Raises RuntimeFailure if every worker is lost, or a shard fails ``MAX_ATTEMPTS`` times."""
    if prepared.batchprompt is not None:
        raise SpecError("mode: batchprompt runs on one device: remove engine.devices and engine.executor")
    shards = shard_plan(prepared.plan, len(pool.devices))
    keys = [prepared.requests[int(r)].key for r in range(len(prepared.requests))]
    remaining: dict[int, set[Hashable]] = {s: {keys[int(r)] for r in shards.rows(s)} for s in range(shards.count)}
    pending: deque[tuple[int, int]] = deque((s, 0) for s in range(shards.count))  # (shard, attempt)
    attempts = dict.fromkeys(range(shards.count), 0)
    workers = [WorkerRecord(d) for d in pool.devices]
    busy: dict[int, int] = {}  # worker -> shard
    kv_budget, kv_peak, stopping, reruns, dtype = None, None, False, 0, None
    log.info("%d shard(s) over %d worker(s) (%s): balance %.2f, %d prefix tokens computed twice",
             shards.count, len(workers), pool.executor, shards.balance, shards.duplicated_prefill)
    t0 = pool.started_at
    while True:
        if stop.requested and not stopping:
            stopping = True
            pool.stop()
        if not stopping:
            for w, rec in enumerate(workers):
                if rec.state == "ready" and w not in busy and pending:
                    s, attempt = pending.popleft()
                    busy[w] = s
                    rec.shards.append(s)
                    pool.assign(w, s, attempt, list(remaining[s]))
        if not busy and (stopping or not pending):
            break
        if all(r.state == "lost" for r in workers):
            raise RuntimeFailure("every worker was lost: " + "; ".join(r.lost or "" for r in workers))
        for event in pool.poll(POLL_S):
            rec = workers[event.worker]
            if isinstance(event, Ready):
                if event.info.get("input") != input_stats(prepared):  # (it would compute other rows)
                    raise RuntimeFailure(f"worker {event.worker} read other input files than this process (changed "
                                         "while the job started?); rerun when the input stays as it is")
                rec.state, rec.load_s = "ready", event.info.get("load_s")
                dtype = dtype or event.info.get("dtype")
                rec.ready_s = round(time.monotonic() - t0, 3)
                log.info("worker %d ready on %s (loaded in %.1f s)", event.worker, pool.devices[event.worker],
                         rec.load_s or 0)
            elif isinstance(event, Rows):
                fresh = [c for c in event.completions if c.key in remaining[event.shard]]
                for c in fresh:
                    remaining[event.shard].discard(c.key)
                    emit(prepared.assembler.add(c), event.shard)
                rec.rows += len(fresh)
                progress.advance(len(fresh), sum(len(c.token_ids) for c in fresh))
            elif isinstance(event, ShardDone):
                busy.pop(event.worker, None)
                rec.busy_s += event.busy_s
                rec.done_s = round(time.monotonic() - t0, 3)
                kv_budget = _most(kv_budget, event.kv_budget_tokens)
                kv_peak = _most(kv_peak, event.kv_peak_tokens)
                if remaining[event.shard] and not event.stopped:  # (an engine never drops rows: a bug)
                    raise RuntimeFailure(f"shard {event.shard} ended with {len(remaining[event.shard])} "
                                         "row(s) not returned")
            elif isinstance(event, Lost):
                rec.state, rec.lost = "lost", event.why.splitlines()[0]
                log.warning("%s", event.why)
                s = busy.pop(event.worker, None)
                if s is not None and remaining[s] and not stopping:
                    attempts[s] += 1
                    if attempts[s] >= MAX_ATTEMPTS:
                        raise RuntimeFailure(f"shard {s} was lost {attempts[s]} times (last: {rec.lost}); the "
                                             "rows received are kept: rerun to resume")
                    reruns += 1
                    pending.appendleft((s, attempts[s]))
                    log.warning("shard %d: %d row(s) not received; rerunning them on another worker", s,
                                len(remaining[s]))
    report = {"executor": pool.executor, "devices": list(pool.devices), "dtype": dtype, **shards.report(),
              "reruns": reruns,
              "workers": [vars(r) | {"busy_s": round(r.busy_s, 3)} for r in workers]}
    return Distributed(report, kv_budget, kv_peak, max((r.load_s or 0.0 for r in workers), default=0.0), stopping)


def _most(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)
