"""Worker processes on this host, one per device (``engine.devices``), each a ``ShardWorker``.

The pool starts one *zygote*: a fresh interpreter (``python -m batchrun.runtime.local_pool``; unlike
multiprocessing's spawn it never imports the caller's main module again) that imports torch, transformers and
the engine once, touching no GPU, and then forks one worker per device, so no worker pays those imports again
(seconds each, and N processes importing at once slow each other down). A GPU worker sees only its own GPU
(``CUDA_VISIBLE_DEVICES``), as ``cuda:0``. Each worker has a socket of its own to the driver (the zygote
passes it on): its job and then tasks in (a shard's keys, or None to exit), events out (``Ready``, ``Rows``,
``ShardDone``, ``Lost``). A worker killed half-way through a message breaks only its own socket; the driver
reads that as end-of-file, and the zygote reports how the worker ended.

Workers ignore Ctrl-C (the driver decides: it sends each worker SIGTERM, a worker's stop, and every worker
ends its shard at the engine's next poll). Workers die with the zygote and the zygote with the driver
(Linux's parent-death signal, and a check of the parent before each task), so a driver killed with SIGKILL
leaves no process behind.
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
from batchrun.runtime.shard_worker import Lost, Ready, ShardWorker
from batchrun.spec import JobSpec

log = logging.getLogger("batchrun")

_PR_SET_PDEATHSIG = 1


class LocalPool:
    """One worker process per device in ``devices`` (``cpu``, ``cuda:N``), forked by a zygote."""

    executor = "local"

    def __init__(self, spec: JobSpec, devices: list[str], done: Collection[Any]):
        self.devices = devices
        self._spec, self._done = spec, set(done)
        cpu_workers = sum(d == "cpu" for d in devices)
        self._threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self._conns: list[Connection] = []
        self._pids: list[int | None] = [None] * len(devices)
        self._exits: dict[int, int] = {}  # worker -> exit code (negative: the signal), as the zygote reports it
        self._gone: set[int] = set()
        self._zygote: subprocess.Popen | None = None
        self._ctl: Connection | None = None
        self.started_at = 0.0
        self._closed = False
        self._zygote_alive = True

    def start(self) -> None:
        """Start the zygote (it imports torch and the engine once), then have it fork one worker per device."""
        self.started_at = time.monotonic()
        ctl, ctl_theirs = socket.socketpair()
        fds, fds_theirs = socket.socketpair()
        self._zygote = subprocess.Popen(
            [sys.executable, "-m", "batchrun.runtime.local_pool", str(ctl_theirs.fileno()), str(fds_theirs.fileno())],
            pass_fds=[ctl_theirs.fileno(), fds_theirs.fileno()], stdin=subprocess.DEVNULL)
        ctl_theirs.close()
        fds_theirs.close()
        self._ctl = Connection(ctl.detach())
        for i, device in enumerate(self.devices):
            mine, theirs = socket.socketpair()
            env, seen_as = _one_gpu(device)
            socket.send_fds(fds, [b"w"], [theirs.fileno()])
            self._ctl.send((i, env))
            theirs.close()
            conn = Connection(mine.detach())
            job = (i, self._spec, seen_as, self._done, self._threads if device == "cpu" else None,
                   self.devices.count(device))
            # (sent from a thread: a big job, many ids already done, would otherwise block until the worker
            # reads it, after the zygote's imports; nothing else is sent to a worker before it is Ready)
            threading.Thread(target=_send_quietly, args=(conn, job), daemon=True).start()
            self._conns.append(conn)
        fds.close()

    def assign(self, worker: int, shard: int, attempt: int, keys: list[Any]) -> None:
        try:
            self._conns[worker].send((shard, attempt, keys))
        except OSError:
            pass  # it died: poll reports it Lost, and the shard goes to another worker

    def poll(self, timeout: float) -> list[Any]:
        """The events that arrived within ``timeout`` seconds, and a ``Lost`` for each worker that died."""
        live = {self._conns[i]: i for i in range(len(self._conns)) if i not in self._gone}
        out: list[Any] = []
        for ready in wait([*live, self._ctl] if self._zygote_alive else list(live), timeout):
            if ready is self._ctl:
                self._zygote_news()
                continue
            i = live[ready]
            try:
                while i not in self._gone and ready.poll():
                    event = ready.recv()
                    out.append(event)
                    if isinstance(event, Lost):
                        self._gone.add(i)
            except (EOFError, OSError):  # its end closed: the process is gone
                out.append(self._lost(i))
        for i in live.values():  # (gone, as the zygote says, with nothing left to read)
            if i not in self._gone and i in self._exits and not self._conns[i].poll():
                out.append(self._lost(i))
        return out

    def _zygote_news(self, wait_s: float = 0.0) -> None:
        """Read what the zygote reports: each worker's pid, and each one's exit."""
        try:
            while self._ctl.poll(wait_s):
                kind, i, value = self._ctl.recv()
                if kind == "pid":
                    self._pids[i] = value
                else:
                    self._exits[i] = value
                wait_s = 0.0
        except (EOFError, OSError):
            self._zygote_alive = False  # (its workers die with it: their sockets report them)

    def _lost(self, i: int) -> Lost:
        self._gone.add(i)
        deadline = time.monotonic() + 5
        while i not in self._exits and time.monotonic() < deadline and self._zygote_alive:
            self._zygote_news(0.1)
        code = self._exits.get(i)
        why = (f"killed by signal {-code}" if code is not None and code < 0 else
               f"exited with code {code}" if code is not None else "lost")
        return Lost(i, f"worker {i} ({self.devices[i]}, pid {self._pids[i]}) {why}")

    def stop(self) -> None:
        """Ask every worker to end its shard at the engine's next poll (SIGTERM: a worker's stop)."""
        self._zygote_news()
        for i, pid in enumerate(self._pids):
            if pid is not None and i not in self._exits:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def close(self) -> None:
        """Let the workers exit; any still there after a grace period is killed; then the zygote goes."""
        if self._closed or self._zygote is None:
            return
        self._closed = True
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.send(None)
        deadline = time.monotonic() + 30
        while len(self._exits) < len(self._conns) and time.monotonic() < deadline and self._zygote.poll() is None:
            self._zygote_news(0.2)
        self._zygote_news()
        for i, pid in enumerate(self._pids):
            if pid is not None and i not in self._exits:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self._ctl.close()  # (the zygote ends when it reads end-of-file)
        try:
            self._zygote.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._zygote.kill()
            self._zygote.wait()
        for c in self._conns:
            c.close()


def _send_quietly(conn: Connection, message: Any) -> None:
    with contextlib.suppress(OSError):
        conn.send(message)


def zygote_main(ctl_fd: int, fds_fd: int) -> None:
    """The zygote (``python -m batchrun.runtime.local_pool CTL FDS``): import torch, transformers and the engine
    once (no GPU touched), then fork a worker for each request of the driver, each with the socket it passes
    and its environment (its GPU), and report each worker's pid and, when it ends, its exit code."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the driver decides when workers stop)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import transformers  # noqa: F401  (the imports that every worker would otherwise repeat)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import batchrun.engine.batch
    import batchrun.engine.reference  # noqa: F401

    ctl = Connection(ctl_fd)
    fds = socket.socket(fileno=fds_fd)
    children: dict[int, int] = {}  # pid -> worker
    while True:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            with contextlib.suppress(OSError):
                ctl.send(("exit", children.pop(pid), os.waitstatus_to_exitcode(status)))
        try:
            if not ctl.poll(0.2):
                continue
            index, env = ctl.recv()
        except (EOFError, OSError):
            return  # the driver is done (or gone)
        _, got, _, _ = socket.recv_fds(fds, 1, 1)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                ctl.close()
                fds.close()
                os.environ.update(env)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                worker_main(got[0])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                os._exit(code)
        os.close(got[0])
        children[pid] = index
        ctl.send(("pid", index, pid))


def worker_main(fd: int) -> None:
    """A worker (forked by the zygote): read its job from the socket ``fd``, load, then run the shards the
    driver sends until it sends None."""
    _die_with_parent()
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = Connection(fd)
    index, spec, device, done, threads, share = conn.recv()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s worker {index} %(levelname)s %(message)s")
    try:
        worker = ShardWorker(spec, device, done, threads, share)
        conn.send(Ready(index, worker.info()))
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return  # the zygote is gone (and the driver with it)
            task = conn.recv()
            if task is None:
                return
            for event in worker.events(index, *task, stop=stop.is_set):  # (task: shard, attempt, keys)
                conn.send(event)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the driver closed its end
    except BaseException as e:
        with contextlib.suppress(OSError):
            conn.send(Lost(index, f"worker {index} ({device}) failed: {type(e).__name__}: {e}\n"
                                  + "".join(traceback.format_exc(limit=8))))
        raise SystemExit(1) from None


def _one_gpu(device: str) -> tuple[dict[str, str], str]:
    """The environment a worker on ``device`` adds, and the device it names there: a GPU worker sees only its GPU
    (``CUDA_VISIBLE_DEVICES``, mapped through this process's own), as ``cuda:0``, so nothing in it can touch
    another worker's GPU by default."""
    env: dict[str, str] = {}
    if not device.startswith("cuda"):
        return env, device
    index = int(device.partition(":")[2] or 0)
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and index >= len(visible):
        raise SpecError(f"engine.devices: {device} is not one of the {len(visible)} GPU(s) that "
                        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} leaves visible")
    env["CUDA_VISIBLE_DEVICES"] = visible[index].strip() if visible else str(index)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # (a worker's KV pool fills most of its GPU: an OOM from
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # fragmentation ended an 8b run without it)
    return env, "cuda:0"


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (elsewhere the check before each task does it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), int(sys.argv[2]))
