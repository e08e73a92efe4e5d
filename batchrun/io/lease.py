"""One writer per output prefix on an object store: a lease object instead of an OS lock.

An object store has no ``flock``. A writer holds ``_lease.json`` under the prefix: its owner (host, pid, a
random token) and an expiry (``BATCHRUN_LEASE_S``, default 600 s from the last renewal). A thread renews it
every quarter of that, so a live job keeps it however long a model load or a step takes, and a crashed one
frees it once it expires (at once when the holder was a process on this very machine, in this pid namespace,
that no longer runs). Acquiring: no lease, or an expired one, or a dead holder's: write ours, wait
``SETTLE_S``, read it back and hold it only if it is still ours; a live lease of another writer is a
``TemporaryFailure`` (exit 75). Before the manifest and the success marker the lease is read again: a writer
that lost it (it expired while the process was stalled, another took it over) writes nothing more.

What this does not guarantee: pyarrow's filesystem layer offers no conditional write (S3's ``If-None-Match``,
GCS's generation preconditions), so two writers that both find the prefix free and write their leases
within ``SETTLE_S`` of each other's reads could both read their own lease back only if one upload takes
longer than ``SETTLE_S`` to land (a stalled request); the last upload wins and the other writer finds it
at its next check (every part write, renewal, manifest). Expiry compares wall clocks across hosts: keep them
synchronised (NTP) to well under the lease time. This module knows nothing of the layout but the name it is
given.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from batchrun.errors import TemporaryFailure

log = logging.getLogger("batchrun")

SETTLE_S = 1.0  # between writing our lease and reading it back: longer than a racing writer's read → write


def lease_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get("BATCHRUN_LEASE_S", "600")))
    except ValueError:
        return 600.0


def _machine() -> str | None:
    """This kernel's boot and this process's pid namespace: a pid means the same process only where both match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


class Lease:
    """The lease ``name`` in ``store`` (a ``batchrun.io.store.ObjectStore``), for one writer."""

    def __init__(self, store: Any, name: str, ttl_s: float | None = None):
        self.store = store
        self.name = name
        self.ttl_s = ttl_s or lease_seconds()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8),
                      "machine": _machine()}
        self.held = False
        self.expires = 0.0  # our lease's expiry, as last written
        self._lost: str | None = None  # why the renewal thread gave up
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading -------------------------------------------------------------------------------------

    def current(self) -> dict[str, Any] | None:
        """The lease as stored; None if there is none or it is not readable (a damaged lease binds no one)."""
        try:
            rec = json.loads(self.store.read(self.name).decode("utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("owner"), dict) else None

    def _ours(self, rec: dict[str, Any] | None) -> bool:
        return rec is not None and rec["owner"].get("token") == self.owner["token"]

    def _binding(self, rec: dict[str, Any] | None) -> bool:
        """Someone else's lease that still holds: not expired, and not a dead process on this machine."""
        if rec is None or self._ours(rec):
            return False
        try:
            live = float(rec.get("expires", 0)) > time.time()
        except (TypeError, ValueError):
            return False
        return live and not _gone(rec["owner"])

    def _held_by(self, rec: dict[str, Any] | None) -> TemporaryFailure:
        return TemporaryFailure(f"output {self.store.where} is locked by another batchrun process ({_who(rec)}); "
                                "retry when it has finished")

    def refuse_if_held(self) -> None:
        """For a reader (a finished job is only read): refuse while another writer holds the prefix."""
        rec = self.current()
        if self._binding(rec):
            raise self._held_by(rec)

    # -- holding -------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease (TemporaryFailure if another writer holds it), then keep renewing it."""
        rec = self.current()
        if self._binding(rec):
            raise self._held_by(rec)
        if rec is not None:
            o = rec["owner"]
            log.warning("%s: taking over the lease of %s pid %s (expired %s, or that process is gone)",
                        self.store.where, o.get("host"), o.get("pid"), rec.get("expires_at"))
        self._write()
        time.sleep(SETTLE_S)
        rec = self.current()
        if not self._ours(rec):
            raise self._held_by(rec)
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name="batchrun-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        now = time.time()
        expires = now + self.ttl_s
        self.store.write(self.name, (json.dumps({"owner": self.owner, "renewed_at": _iso(now), "expires": expires,
                                                 "expires_at": _iso(expires)}, indent=2) + "\n").encode())
        self.expires = expires

    def renew(self) -> None:
        """Extend the lease if it is still ours (else it is lost: TemporaryFailure)."""
        with self._write_lock:
            if self._stop.is_set():
                return
            rec = self.current()
            if not self._ours(rec):
                self._lost = f"taken over: {_who(rec)}"
                raise self._lost_error()
            self._write()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except TemporaryFailure as e:
                if self._lost or time.time() >= self.expires:
                    self._lost = self._lost or f"not renewed before it expired: {e}"
                    return
                log.warning("%s: could not renew the lease (retrying): %s", self.store.where, e)
            except Exception as e:  # never let the thread die silently while the lease still matters
                self._lost = f"renewal failed: {e}"
                return

    def ensure(self) -> None:
        """Cheap check before a write: the renewal thread has not lost the lease, and it has not expired."""
        if self._lost is None and self.held and time.time() >= self.expires:
            self._lost = f"it expired at {_iso(self.expires)} without being renewed"
        if self._lost is not None or not self.held:
            raise self._lost_error()

    def check(self) -> None:
        """Read the lease again (before the manifest and the success marker): still ours and unexpired."""
        self.ensure()
        rec = self.current()
        if not self._ours(rec):
            self._lost = f"taken over: {_who(rec)}"
            raise self._lost_error()

    def _lost_error(self) -> TemporaryFailure:
        return TemporaryFailure(f"output {self.store.where}: this run no longer holds its lease "
                                f"({self._lost or 'never taken'}); nothing more is written: rerun the same command "
                                "when the other run has finished")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (errors only logged: it expires anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        with self._write_lock:
            try:
                if self._ours(self.current()):
                    self.store.delete(self.name)
            except Exception as e:
                log.warning("%s: could not release the lease (it expires by itself): %s", self.store.where, e)


def _who(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "no lease there now"
    o = rec["owner"]
    return f"lease held by {o.get('host', '?')} pid {o.get('pid', '?')} until {rec.get('expires_at', '?')}"


def _gone(owner: dict[str, Any]) -> bool:
    """The holder was a process on this machine, in this pid namespace, that no longer runs."""
    here = _machine()
    if here is None or owner.get("machine") != here or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError, OverflowError):
        return False
    return False
