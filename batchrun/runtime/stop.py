"""Graceful stop: SIGTERM (Airflow's on_kill, a cron timeout) or Ctrl-C asks the job to stop.

The handlers are installed when a job starts (before the model loads). While nothing is running that could
save rows (checks, reading, tokenizing, loading the weights) the flag is ``immediate`` and the first signal
stops the job at once (``StopRequested``); while rows are generated it only sets the flag, and the job stops
admitting work after the current engine step (or reference batch). Either way the job writes every finished
row, marks the manifest incomplete and exits 75 — rerunning resumes. A second signal stops at once
(KeyboardInterrupt); committed rows are still kept.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger("batchrun")


class StopRequested(KeyboardInterrupt):
    """The first signal, raised where the job can stop at once (``StopFlag.at_once``)."""


class StopFlag:
    def __init__(self) -> None:
        self.signal: str | None = None
        self.immediate = False  # a signal raises StopRequested at once (set by ``at_once``)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextmanager
    def at_once(self) -> Iterator[None]:
        """Within: a signal (or one that came before) raises ``StopRequested`` at once."""
        old, self.immediate = self.immediate, True
        try:
            if self.requested:
                raise StopRequested(self.signal)
            yield
        finally:
            self.immediate = old

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within: a signal only sets the flag (files being written are never cut half-way)."""
        old, self.immediate = self.immediate, False
        try:
            yield
        finally:
            self.immediate = old


class handle_signals:
    """Context manager installing the SIGTERM/SIGINT handlers (main thread only; elsewhere a no-op)."""

    def __init__(self, flag: StopFlag):
        self.flag = flag
        self._old: dict[int, object] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.flag.requested:
            raise KeyboardInterrupt(f"second {name}")
        self.flag.signal = name
        if self.flag.immediate:
            log.warning("%s received: stopping now, saving what is finished, then exiting (75)", name)
            raise StopRequested(name)
        log.warning("%s received: finishing the current step, saving finished rows, then exiting (75); "
                    "send it again to stop at once", name)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self.flag

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
