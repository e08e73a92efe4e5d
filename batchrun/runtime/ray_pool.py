"""Workers on a Ray cluster (``engine.executor: ray``): one Ray actor per device, each a ``ShardWorker``.

The driver (this process) joins the cluster at ``engine.ray_address`` (None: ``RAY_ADDRESS``, or a Ray that
this process already started, or a new local one) and starts one actor per device: ``engine.devices: auto``
is one per GPU of the cluster (or, on a cluster without GPUs, one per node); a list is one actor per entry
(``cuda``/``cuda:N``: an actor holding one GPU, which Ray picks; ``cpu``: an actor holding one CPU). Every
node needs batchrun installed and the model and input at the same paths (a shared filesystem or an object
store); the driver alone writes the output.

An actor streams its finished rows back as a Ray generator, so the driver writes them as they come; an actor
that dies (its process killed, its node lost) fails its generator, and the driver reruns what it had not
received on another actor. A stop asks every actor to end its shard at the engine's next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

from batchrun.errors import SpecError, TemporaryFailure
from batchrun.runtime.shard_worker import Lost, Ready, Rows, ShardDone, ShardWorker
from batchrun.spec import JobSpec


class RayWorker:
    """The actor: built on its node, loads there (``setup``), then runs shards (``run``, a generator)."""

    def __init__(self, index: int, spec: JobSpec, device: str, done: set):
        self.index, self.spec, self.device, self.done = index, spec, device, done
        self.worker: ShardWorker | None = None
        self.stopping = threading.Event()

    def setup(self) -> Ready:
        self.worker = ShardWorker(self.spec, self.device, self.done)
        import socket

        return Ready(self.index, self.worker.info() | {"node": socket.gethostname()})

    def run(self, shard: int, attempt: int, keys: list[Any]) -> Iterator[Rows | ShardDone]:
        yield from self.worker.events(self.index, shard, attempt, keys, stop=self.stopping.is_set,
                                      before_dying=lambda: time.sleep(0.5))  # (let Ray deliver the rows)

    def stop(self) -> None:
        self.stopping.set()


class RayPool:
    executor = "ray"

    def __init__(self, spec: JobSpec, done: Collection[Any]):
        try:
            import ray
        except ImportError:
            raise SpecError("engine.executor: ray needs Ray on this machine and every node: pip install "
                            "'batchrun[ray]'") from None
        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=spec.engine.ray_address, logging_level=logging.WARNING, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = spec.engine.ray_address or "RAY_ADDRESS or a new local Ray"
                raise TemporaryFailure(f"engine.ray_address: cannot join the Ray cluster ({where}): {e}") from None
            self._started_ray = True
        self.devices = self._devices(spec)
        actor = ray.remote(RayWorker)
        self._actors = [actor.options(num_gpus=1 if d.startswith("cuda") else 0, num_cpus=1, max_concurrency=2,
                                      max_restarts=0, name=None).remote(i, spec, "cuda" if d.startswith("cuda")
                                                                        else "cpu", set(done))
                        for i, d in enumerate(self.devices)]
        self._setup: dict[Any, int] = {}  # setup ref -> worker
        self._runs: dict[Any, int] = {}  # shard generator -> worker
        self._gone: set[int] = set()
        self.started_at = 0.0

    def _devices(self, spec: JobSpec) -> list[str]:
        if isinstance(spec.engine.devices, list):
            return list(spec.engine.devices)
        gpus = int(self._ray.cluster_resources().get("GPU", 0))
        if gpus:
            return ["cuda"] * gpus
        return ["cpu"] * max(1, sum(1 for n in self._ray.nodes() if n.get("Alive")))

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._setup = {a.setup.remote(): i for i, a in enumerate(self._actors)}

    def assign(self, worker: int, shard: int, attempt: int, keys: list[Any]) -> None:
        self._runs[self._actors[worker].run.remote(shard, attempt, keys)] = worker

    def poll(self, timeout: float) -> list[Any]:
        ray = self._ray
        waiting = [*self._setup, *self._runs]
        if not waiting:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        out: list[Any] = []
        for w in ready:
            if w in self._setup:
                i = self._setup.pop(w)
                try:
                    out.append(ray.get(w))
                except Exception as e:
                    out.append(self._lost(i, e))
                continue
            i = self._runs[w]
            try:
                event = ray.get(next(w))
            except StopIteration:
                self._runs.pop(w)
                continue
            except Exception as e:
                self._runs.pop(w)
                out.append(self._lost(i, e))
                continue
            out.append(event)
        return out

    def _lost(self, i: int, e: BaseException) -> Lost:
        self._gone.add(i)
        self._ray.kill(self._actors[i], no_restart=True)
        text = str(e).strip().splitlines()
        return Lost(i, f"worker {i} ({self.devices[i]}, a Ray actor) lost: {type(e).__name__}: "
                       f"{text[0] if text else ''}\n" + "\n".join(text[1:12]))

    def stop(self) -> None:
        for i, a in enumerate(self._actors):
            if i not in self._gone:
                a.stop.remote()

    def close(self) -> None:
        if not self._actors:
            return
        for a in self._actors:
            self._ray.kill(a, no_restart=True)
        self._actors = []
        if self._started_ray:
            self._ray.shutdown()
