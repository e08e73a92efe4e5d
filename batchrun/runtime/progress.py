"""Progress for people and for logs: a rich bar on a terminal, periodic log lines (text or JSON) elsewhere.

The job calls ``start``, ``advance`` and ``finish``; it never knows which kind it talks to.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger("batchrun")


class Progress:
    """Counts rows and output tokens; subclasses show them."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.tokens = 0
        self.t0 = time.monotonic()

    def start(self, total_rows: int, already_done: int = 0) -> None:
        self.total, self.done, self.tokens, self.t0 = total_rows, already_done, 0, time.monotonic()
        self._initial = already_done

    def advance(self, rows: int, output_tokens: int) -> None:
        self.done += rows
        self.tokens += output_tokens

    def finish(self) -> None:
        pass

    def rates(self) -> tuple[float, float, float | None]:
        """(rows/s, output tokens/s, ETA seconds) for the rows done in this run."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rows_s = (self.done - getattr(self, "_initial", 0)) / elapsed
        eta = (self.total - self.done) / rows_s if rows_s > 0 else None
        return rows_s, self.tokens / elapsed, eta


class LogProgress(Progress):
    """A log line every ``interval`` seconds and at the end (for cron, Airflow, CI logs)."""

    def __init__(self, interval: float = 10.0, json_lines: bool = False) -> None:
        super().__init__()
        self.interval = interval
        self.json_lines = json_lines
        self._last = 0.0
        self._emitted_at = -1

    def advance(self, rows: int, output_tokens: int) -> None:
        super().advance(rows, output_tokens)
        if time.monotonic() - self._last >= self.interval:
            self._emit()

    def finish(self) -> None:
        if self._emitted_at != self.done:
            self._emit()

    def _emit(self) -> None:
        self._last = time.monotonic()
        self._emitted_at = self.done
        rows_s, tok_s, eta = self.rates()
        if self.json_lines:
            log.info(json.dumps({"event": "progress", "rows_done": self.done, "rows_total": self.total,
                                 "output_tokens_per_s": round(tok_s, 2), "rows_per_s": round(rows_s, 3),
                                 "eta_s": None if eta is None else round(eta, 1)}))
        else:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            eta_txt = "?" if eta is None else f"{eta:.0f}s"
            log.info("progress: %d/%d rows (%.0f%%), %.1f output tok/s, eta %s",
                     self.done, self.total, pct, tok_s, eta_txt)


class RichProgress(Progress):
    """A live bar on stderr: rows, output tokens/s, ETA."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("rows  {task.fields[tok_s]:.1f} tok/s"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
        self._task = None

    def start(self, total_rows: int, already_done: int = 0) -> None:
        super().start(total_rows, already_done)
        self._bar.start()
        self._task = self._bar.add_task("generating", total=total_rows, completed=already_done, tok_s=0.0)

    def advance(self, rows: int, output_tokens: int) -> None:
        super().advance(rows, output_tokens)
        self._bar.update(self._task, completed=self.done, tok_s=self.rates()[1])

    def finish(self) -> None:
        if self._task is not None:
            self._bar.stop()


def default_progress(log_format: str = "text", quiet: bool = False) -> Progress:
    if quiet:
        return Progress()
    if log_format == "text" and sys.stderr.isatty():
        return RichProgress()
    # BATCHRUN_PROGRESS_INTERVAL: seconds between progress log lines (default 10).
    interval = float(os.environ.get("BATCHRUN_PROGRESS_INTERVAL") or 10.0)
    return LogProgress(interval=interval, json_lines=log_format == "json")
