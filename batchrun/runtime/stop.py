"""Graceful stop: SIGTERM (Airflow's on_kill, a cron timeout) or Ctrl-C asks the job to stop.

The first signal sets a flag; the job stops admitting work after the current engine step (or reference
batch), writes every finished row, marks the manifest incomplete and exits 75 — rerunning resumes. A second
signal stops at once (KeyboardInterrupt); committed rows are still kept.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("batchrun")


class StopFlag:
    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None


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
