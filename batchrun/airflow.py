"""Airflow integration: ``BatchrunOperator`` runs a job, ``BatchrunSuccessSensor`` waits for its ``_SUCCESS``.

Install with ``pip install 'batchrun[airflow]'``, or keep Airflow in its own virtualenv (its pins may conflict
with batchrun's): install batchrun there with ``pip install --no-deps batchrun`` (this module needs only the
standard library and Airflow) and point ``python=`` at the interpreter of batchrun's own virtualenv::

    from airflow.sdk import DAG
    from batchrun.airflow import BatchrunOperator, BatchrunSuccessSensor

    run = BatchrunOperator(task_id="summaries", job="jobs/example.yaml",
                           overrides={"output.path": "out/summaries/{{ ds }}"}, retries=3,
                           python="/opt/batchrun/.venv/bin/python")
    done = BatchrunSuccessSensor(task_id="done", output_dir="out/summaries/{{ ds }}", deferrable=True)
    run >> done

The operator runs ``python -m batchrun --log-format json submit JOB --json --set K=V ...`` in a subprocess,
streams its log lines to the task log and returns the JSON summary (pushed to XCom as ``return_value``).
Exit codes map to Airflow's retry rules: 0 succeeds; 2, 65 and 78 (usage, bad data, invalid spec: retrying
cannot help) raise ``AirflowFailException``, which fails the task at once without retries; 75 (temporary:
locked output, stopped by a signal, disk full) and anything else raise ``AirflowException``, which Airflow
retries while the task has retries left.

This module imports only the standard library and Airflow: none of batchrun's dependencies (torch, duckdb,
pydantic, ...) nor batchrun.api, so it loads in an Airflow environment without them. (Airflow itself loads
pydantic, its own dependency.)
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, ClassVar

try:  # Airflow 3: the Task SDK is the public interface for DAG authors
    from airflow.sdk import BaseOperator, BaseSensorOperator
except ImportError:  # Airflow 2
    from airflow.models.baseoperator import BaseOperator
    from airflow.sensors.base import BaseSensorOperator
try:  # Airflow >= 3.1 (airflow.exceptions still has them, deprecated)
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2 and 3.0
    from airflow.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent  # the same path in Airflow 2 and 3

__all__ = ["EXIT_CODES", "NO_RETRY_EXIT_CODES", "BatchrunOperator", "BatchrunSuccessSensor",
           "BatchrunSuccessTrigger"]

# batchrun's exit codes (batchrun.errors; not imported, so that this module stays dependency-free)
EXIT_CODES = {
    0: "ok",
    1: "runtime failure",
    2: "usage error",
    65: "input data error",
    75: "temporary failure",
    78: "invalid job spec or unusable output directory",
}
NO_RETRY_EXIT_CODES = frozenset({2, 65, 78})  # retrying cannot help: fail the task at once
SUCCESS = "_SUCCESS"


def render_override(key: str, value: Any) -> str:
    """One ``--set`` argument: strings as they are (batchrun reads the value as YAML), anything else as JSON
    (which is YAML too): ``{"sampling.max_tokens": 4}`` -> ``sampling.max_tokens=4``."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


class BatchrunOperator(BaseOperator):
    """Run a batchrun job (``batchrun submit``) in a subprocess and return its JSON summary.

    :param job: path of the job's YAML file (templated), relative to ``cwd`` if given.
    :param overrides: spec fields to override, ``{"field.path": value}`` (templated, e.g.
        ``{"output.path": "out/x/{{ ds }}"}``); each becomes ``--set field.path=value``.
    :param fresh: pass ``--fresh``: delete this job's earlier results and start over.
    :param python: the interpreter that has batchrun and its dependencies (default: Airflow's own).
    :param cwd: working directory of the job (templated; default: the worker's).

    Returns the summary (``status``, ``rows_ok``, ``rows_error``, ``output``, ...), pushed to XCom.
    ``on_kill`` sends SIGTERM to batchrun, which stops gracefully (committed rows are kept; exit 75), waits
    up to ``kill_timeout`` seconds, then sends SIGKILL.
    """

    template_fields: Sequence[str] = ("job", "overrides", "cwd")
    template_fields_renderers: ClassVar[dict[str, str]] = {"overrides": "json"}
    ui_color = "#e8f0fe"
    kill_timeout: float = 60.0

    def __init__(self, *, job: str, overrides: dict[str, Any] | None = None, fresh: bool = False,
                 python: str | None = None, cwd: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.overrides = overrides
        self.fresh = fresh
        self.python = python
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self._terminating = False  # SIGTERM sent: never twice
        self._executing = False  # execute is reading batchrun's output

    def command(self) -> list[str]:
        cmd = [self.python or sys.executable, "-m", "batchrun", "--log-format", "json", "submit", str(self.job),
               "--json"]
        for key, value in (self.overrides or {}).items():
            cmd += ["--set", render_override(str(key), value)]
        if self.fresh:
            cmd.append("--fresh")
        return cmd

    def execute(self, context: Any) -> dict[str, Any]:
        cmd = self.command()
        self.log.info("running %s", " ".join(cmd))
        self._terminating = False
        try:
            # Its own session: a signal Airflow sends to the task's process group does not reach batchrun too (a
            # second signal would stop it at once); on_kill sends exactly one SIGTERM (a graceful stop).
            self.proc = proc = subprocess.Popen(cmd, cwd=self.cwd or None, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                encoding="utf-8", errors="replace", bufsize=1,
                                                start_new_session=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:  # a wrong python= or cwd=
            raise AirflowFailException(f"cannot run batchrun: {e} (python={cmd[0]!r}, cwd={self.cwd!r})") from e
        self._executing = True
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.extend(proc.stdout or ()), daemon=True)
        reader.start()
        threading.Thread(target=self._watchdog, args=(proc,), daemon=True).start()
        tail: collections.deque[str] = collections.deque(maxlen=20)
        try:
            for line in proc.stderr or ():
                line = line.rstrip("\n")
                if line:
                    tail.append(line)
                    self._log_line(line)
            rc = proc.wait()
            reader.join()
        except BaseException:  # interrupted (a timeout, SIGINT): never leave batchrun running behind the task
            self._stop(proc)
            raise
        finally:
            self._executing = False
        for line in stdout[:-1]:
            if line.strip():
                self.log.info("%s", line.rstrip("\n"))
        summary = _parse_summary(stdout)
        if rc == 0 and summary is not None:
            self.log.info("batchrun summary: %s", json.dumps(summary, default=str))
            return summary
        raise self._failure(rc, summary, list(tail))

    def _log_line(self, line: str) -> None:
        """One line of batchrun's stderr into the task log, at its level (``--log-format json`` lines)."""
        level = "info"
        if line.startswith("{"):
            try:
                level = str(json.loads(line).get("level", "info"))
            except (ValueError, AttributeError):
                pass
        if level == "warning":
            self.log.warning("%s", line)
        elif level in ("error", "critical"):
            self.log.error("%s", line)
        else:
            self.log.info("%s", line)

    def _failure(self, rc: int, summary: dict[str, Any] | None, tail: list[str]) -> AirflowException:
        meaning = EXIT_CODES.get(rc, "killed by a signal" if rc < 0 else "unknown exit code")
        if rc == 0:
            meaning = "ok, but no JSON summary on its last stdout line (is this python's batchrun too old?)"
        retry = "not retried" if rc in NO_RETRY_EXIT_CODES else "Airflow retries while the task has retries left"
        head = f"batchrun submit {self.job} exited {rc} ({meaning}; {retry})"
        if self._terminating:
            head += " after on_kill sent it SIGTERM"
        if summary is not None and summary.get("error"):
            detail = str(summary["error"])
            problems = summary.get("problems") or []
            if problems:
                detail += "\n" + "\n".join(f"  - {p}" for p in problems)
        else:
            detail = "\n".join(tail[-10:]) or "(no output)"
        message = f"{head}: {detail}"
        return AirflowFailException(message) if rc in NO_RETRY_EXIT_CODES else AirflowException(message)

    def on_kill(self) -> None:
        """SIGTERM to batchrun (once: a second signal would stop it at once); SIGKILL kill_timeout s later.

        Airflow calls this from its SIGTERM handler, on the thread that runs ``execute``: it takes no lock and
        writes no log line there (either could deadlock with what ``execute`` was doing). While ``execute``
        runs, it keeps reading batchrun's output until batchrun exits (75), and a watchdog thread logs and
        sends SIGKILL if needed; otherwise this waits here.
        """
        proc = self.proc
        if proc is None or proc.returncode is not None:  # not started, or exited and reaped (its pid is gone)
            return
        if self._sigterm(proc) and not self._executing:
            self._stop(proc)

    def _sigterm(self, proc: subprocess.Popen[str]) -> bool:
        """SIGTERM to batchrun, once (no lock, no log line: safe in a signal handler); False if it is gone."""
        if not self._terminating:
            self._terminating = True
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return False
        return True

    def _watchdog(self, proc: subprocess.Popen[str]) -> None:
        """While ``execute`` runs: once on_kill has sent SIGTERM, say so, and SIGKILL after kill_timeout s."""
        while not self._terminating:
            if proc.returncode is not None:
                return
            time.sleep(0.2)
        self._stop(proc)

    def _stop(self, proc: subprocess.Popen[str]) -> None:
        """SIGTERM unless sent already, wait up to kill_timeout s, then SIGKILL batchrun's process group."""
        if proc.poll() is not None or not self._sigterm(proc):
            return
        self.log.info("sent SIGTERM to batchrun (pid %d): it stops gracefully and keeps its committed rows; "
                      "SIGKILL if it still runs in %g s", proc.pid, self.kill_timeout)
        try:
            proc.wait(timeout=self.kill_timeout)
        except subprocess.TimeoutExpired:
            self.log.warning("batchrun (pid %d) did not stop within %g s: SIGKILL", proc.pid, self.kill_timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its session's group: anything it started, too
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()


def _parse_summary(stdout: list[str]) -> dict[str, Any] | None:
    """The JSON object on the last non-empty stdout line (``batchrun ... --json``), or None."""
    for line in reversed(stdout):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


class BatchrunSuccessTrigger(BaseTrigger):
    """Fires once ``<output_dir>/_SUCCESS`` exists, checking every ``poke_interval`` seconds (asyncio)."""

    def __init__(self, output_dir: str, poke_interval: float = 60.0) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"output_dir": self.output_dir, "poke_interval": self.poke_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        path = os.path.join(self.output_dir, SUCCESS)
        while not await asyncio.to_thread(os.path.exists, path):
            await asyncio.sleep(self.poke_interval)
        self.log.info("found %s", path)
        yield TriggerEvent({"status": "success", "path": path})


class BatchrunSuccessSensor(BaseSensorOperator):
    """Wait until a batchrun output directory is complete: ``<output_dir>/_SUCCESS`` exists.

    :param output_dir: the job's ``output.path`` (templated).
    :param deferrable: wait in Airflow's triggerer (``BatchrunSuccessTrigger``) instead of a worker slot.

    Returns the path of ``_SUCCESS``.
    """

    template_fields: Sequence[str] = ("output_dir",)
    ui_color = "#e6f4ea"

    def __init__(self, *, output_dir: str, deferrable: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.deferrable = deferrable

    @property
    def success_path(self) -> str:
        return os.path.join(self.output_dir, SUCCESS)

    def poke(self, context: Any) -> bool:
        self.log.info("waiting for %s", self.success_path)
        return os.path.exists(self.success_path)

    def execute(self, context: Any) -> str:
        if not self.deferrable:
            super().execute(context)
            return self.success_path
        if self.poke(context):
            return self.success_path
        self.defer(trigger=BatchrunSuccessTrigger(self.output_dir, float(self.poke_interval)),
                   method_name="execute_complete", timeout=timedelta(seconds=float(self.timeout)))
        raise AssertionError("defer() returned")  # pragma: no cover: defer raises TaskDeferred

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> str:
        if not event or event.get("status") != "success":
            raise AirflowException(f"waiting for {self.success_path} failed: {event!r}")
        self.log.info("%s exists", event.get("path", self.success_path))
        return str(event.get("path", self.success_path))
