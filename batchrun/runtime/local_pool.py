"""Worker processes on this host, one per device (``engine.devices``), each a ``ShardWorker``.

Each worker is a fresh interpreter (``python -m batchrun.runtime.local_pool``: CUDA and forked threads do not
mix, and unlike multiprocessing's spawn it never imports the caller's main module again) with a socket of its
own to the driver: its job and then tasks in (a shard's keys, or None to exit), events out (``Ready``,
``Rows``, ``ShardDone``, ``Lost``). A socket per worker means a worker killed half-way through a message
breaks only its own; the driver reads that as end-of-file and reports the worker ``Lost``.

Workers ignore Ctrl-C (the driver decides: it sends each worker SIGTERM, a worker's stop, and every worker
ends its shard at the engine's next poll). A worker dies with the driver (Linux's parent-death
signal, and a check of its parent before each task), so a driver killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Collection
from multiprocessing.connection import Connection, wait
from typing import Any

from batchrun.errors import SpecError
from batchrun.runtime.shard_worker import Lost, Ready, Rows, ShardDone, ShardWorker, failpoint
from batchrun.spec import JobSpec

log = logging.getLogger("batchrun")

_PR_SET_PDEATHSIG = 1


class LocalPool:
    """One worker process per device in ``devices`` (``cpu``, ``cuda:N``)."""

    executor = "local"

    def __init__(self, spec: JobSpec, devices: list[str], done: Collection[Any]):
        self.devices = devices
        self._spec, self._done = spec, set(done)
        cpu_workers = sum(d == "cpu" for d in devices)
        self._threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen] = []
        self._gone: set[int] = set()
        self.started_at = 0.0
        self._closed = False

    def start(self) -> None:
        self.started_at = time.monotonic()
        for i, device in enumerate(self.devices):
            mine, theirs = socket.socketpair()
            env, seen_as = _one_gpu(device)
            proc = subprocess.Popen([sys.executable, "-m", "batchrun.runtime.local_pool", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
            theirs.close()
            conn = Connection(mine.detach())
            conn.send((i, self._spec, seen_as, self._done, self._threads if device == "cpu" else None,
                       self.devices.count(device), os.getpid()))
            self._conns.append(conn)
            self._procs.append(proc)

    def assign(self, worker: int, shard: int, attempt: int, keys: list[Any]) -> None:
        try:
            self._conns[worker].send((shard, attempt, keys))
        except OSError:
            pass  # it died: poll reports it Lost, and the shard goes to another worker

    def poll(self, timeout: float) -> list[Any]:
        """The events that arrived within ``timeout`` seconds, and a ``Lost`` for each worker that died."""
        live = {self._conns[i]: i for i in range(len(self._procs)) if i not in self._gone}
        out: list[Any] = []
        for ready in wait(list(live), timeout):
            i = live[ready]
            try:
                while i not in self._gone and ready.poll():
                    event = ready.recv()
                    out.append(event)
                    if isinstance(event, Lost):
                        self._gone.add(i)
            except (EOFError, OSError):  # its end closed: the process is gone
                out.append(self._lost(i))
        for i in live.values():  # (a process gone while its socket still held unread events: next poll)
            if i not in self._gone and self._procs[i].poll() is not None and not self._conns[i].poll():
                out.append(self._lost(i))
        return out

    def _lost(self, i: int) -> Lost:
        self._gone.add(i)
        p = self._procs[i]
        try:
            code = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return Lost(i, f"worker {i} ({self.devices[i]}, pid {p.pid}) {why}")

    def stop(self) -> None:
        """Ask every worker to end its shard at the engine's next poll (SIGTERM: a worker's stop)."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Let the workers exit; any still there after a grace period is terminated, then killed."""
        if self._closed:
            return
        self._closed = True
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.send(None)
        deadline = time.monotonic() + 30
        for p in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
            if p.poll() is None:
                p.kill()
                p.wait()
        for c in self._conns:
            c.close()


def worker_main(fd: int) -> None:
    """A worker process (``python -m batchrun.runtime.local_pool FD``): read its job from the socket ``fd``,
    load, then run the shards the driver sends until it sends None."""
    _die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = Connection(fd)
    index, spec, device, done, threads, share, parent = conn.recv()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {index} %(levelname)s %(message)s")
    try:
        worker = ShardWorker(spec, device, done, threads, share)
        conn.send(Ready(index, worker.info()))
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return  # the driver is gone
            task = conn.recv()
            if task is None:
                return
            shard, attempt, keys = task
            t = time.monotonic()
            for batch in worker.run(keys, interrupt=stop.is_set):
                conn.send(Rows(index, shard, batch))
                failpoint(shard, attempt)
            conn.send(ShardDone(index, shard, stop.is_set(), time.monotonic() - t, *worker.kv_usage()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the driver closed its end
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(Lost(index, f"worker {index} ({device}) failed: {type(e).__name__}: {e}\n"
                                  + "".join(traceback.format_exc(limit=8))))
        raise SystemExit(1) from None


def _one_gpu(device: str) -> tuple[dict[str, str], str]:
    """The environment of a worker on ``device`` and the device it names there: a GPU worker sees only its GPU
    (``CUDA_VISIBLE_DEVICES``, mapped through this process's own), as ``cuda:0``, so nothing in it can touch
    another worker's GPU by default."""
    env = dict(os.environ)
    if not device.startswith("cuda"):
        return env, device
    index = int(device.partition(":")[2] or 0)
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index >= len(visible):
        raise SpecError(f"engine.devices: {device} is not one of the {len(visible)} GPU(s) that "
                        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} leaves visible")
    env["CUDA_VISIBLE_DEVICES"] = visible[index].strip() if visible else str(index)
    return env, "cuda:0"


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (elsewhere the check before each task does it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]))
