"""The output dataset: Parquet part files written as results arrive, then a manifest and a success marker.

Layout of ``output.path``::

    _batchrun_job.json   what job owns this directory (written first; used to resume or refuse)
    part-000000.parquet  result rows, in completion order; each part is complete once it has its name
    _manifest.json       counts, timings, versions (written last but one)
    _SUCCESS             the job finished (written last)
    .lock                held (flock) while a job writes here

Every file is written under a temporary name and renamed, so a crash never leaves a file that looks
committed. Readers: ``duckdb "SELECT * FROM 'out/job/*.parquet'"`` or ``polars.read_parquet('out/job/')``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun import __version__
from batchrun.errors import SpecError, TemporaryFailure

JOB_FILE = "_batchrun_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
LOCK = ".lock"
_PART = re.compile(r"^part-(\d{6})\.parquet$")

RESULT_FIELDS = [
    pa.field("output", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
]
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS]


def output_schema(input_schema: pa.Schema, id_column: str, columns: list[str]) -> pa.Schema:
    """The parts' columns: the id, the passthrough ``columns`` (types as in the input), then the results."""
    return pa.schema([input_schema.field(id_column)] + [input_schema.field(c) for c in columns] + RESULT_FIELDS)


@dataclass(frozen=True)
class OutputState:
    """What an output directory holds right now (read by ``status`` and before a job starts)."""

    path: str
    exists: bool
    owned: bool  # it has a batchrun job file
    complete: bool
    job: dict[str, Any] | None
    manifest: dict[str, Any] | None
    parts: list[str] = field(default_factory=list)
    rows: int = 0


def read_state(path: str | Path) -> OutputState:
    p = Path(path)
    if not p.is_dir():
        return OutputState(str(p), exists=p.exists(), owned=False, complete=False, job=None, manifest=None)
    job = _read_json(p / JOB_FILE)
    manifest = _read_json(p / MANIFEST)
    parts = sorted(f.name for f in p.iterdir() if _PART.match(f.name))
    rows = sum(pq.ParquetFile(p / f).metadata.num_rows for f in parts)
    return OutputState(str(p), True, job is not None, (p / SUCCESS).is_file() and manifest is not None,
                       job, manifest, parts, rows)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TemporaryFailure(f"cannot read {path}: {e}") from None


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TemporaryFailure(f"cannot write {path}: {e}; fix the cause (free space, permissions) and rerun") from None


class Sink:
    """Owns one output directory for the length of a job: lock, parts, manifest, success marker."""

    def __init__(self, path: str | Path, part_rows: int):
        self.path = Path(path)
        self.schema: pa.Schema | None = None
        self.part_rows = part_rows
        self._buffer: list[dict[str, Any]] = []
        self._next_part = 0
        self._lock_fd: int | None = None
        self.rows_written = 0
        self.last_flush = time.monotonic()

    # -- lifetime ------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the directory's OS lock (released by the OS if this process dies); exit 75 if taken."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TemporaryFailure(f"output.path: cannot create or write {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TemporaryFailure(f"output {self.path} is locked by another batchrun process; "
                                   "retry when it has finished") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def prepare(self, job: dict[str, Any], fresh: bool) -> tuple[OutputState, set[Any]]:
        """Check the directory against ``job``; returns its state and the ids already committed.

        A directory of another job (or of files batchrun did not write) is refused unless ``fresh``.
        """
        state = read_state(self.path)
        foreign = [f for f in os.listdir(self.path) if not is_batchrun_file(f)]
        if foreign and not state.owned:
            raise SpecError(f"output.path: {self.path} holds files batchrun did not write "
                            f"({', '.join(sorted(foreign)[:3])}); choose an empty or new directory")
        if fresh:
            self._clear()
            state = read_state(self.path)
        elif state.owned and state.job.get("results_hash") != job["results_hash"]:
            raise SpecError(f"output.path: {self.path} holds results of a different job (the model, input, "
                            "prompt or sampling changed); rerun with --fresh to rebuild it, or choose another "
                            "output.path")
        done: set[Any] = set()
        id_col = job["id_column"]
        for name in state.parts:
            done.update(pq.read_table(self.path / name, columns=[id_col]).column(id_col).to_pylist())
        self._next_part = max((int(_PART.match(p).group(1)) + 1 for p in state.parts), default=0)
        if not state.owned or fresh:
            write_atomic(self.path / JOB_FILE, dumps(job))
        if not state.complete:
            (self.path / SUCCESS).unlink(missing_ok=True)
        return state, done

    def _clear(self) -> None:
        for f in os.listdir(self.path):
            if is_batchrun_file(f) and f != LOCK:
                os.unlink(self.path / f)

    # -- rows ----------------------------------------------------------------------------------------

    def set_schema(self, schema: pa.Schema, metadata: dict[str, Any]) -> None:
        """The parts' schema; ``metadata`` goes into each part's Parquet key-value metadata (``batchrun``)."""
        self.schema = schema.with_metadata({b"batchrun": json.dumps(metadata, sort_keys=True).encode()})

    def add(self, row: dict[str, Any], flush_after_s: float = 30.0) -> None:
        """Buffer one finished row; write a part when ``part_rows`` are buffered or every ``flush_after_s``."""
        self._buffer.append(row)
        if len(self._buffer) >= self.part_rows or time.monotonic() - self.last_flush >= flush_after_s:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            rows = self._buffer[: self.part_rows]
            self._write_part(pa.Table.from_pylist(rows, schema=self.schema))
            self._buffer = self._buffer[self.part_rows :]
            self.rows_written += len(rows)
        self.last_flush = time.monotonic()

    def _write_part(self, table: pa.Table) -> None:
        """Write one part under a temporary name, then rename it: a part exists only once it is complete.
        A write error (disk full, permissions) leaves no part behind and keeps the rows buffered."""
        target = self.path / f"part-{self._next_part:06d}.parquet"
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TemporaryFailure(f"cannot write results to {self.path}: {e}; the rows written before are kept: "
                                   "fix the cause (free space, permissions) and rerun to resume") from None
        self._next_part += 1

    def totals(self) -> dict[str, int]:
        """Counts over every committed part (this run's and earlier runs')."""
        out = {"rows": 0, "error": 0, "prompt_tokens": 0, "output_tokens": 0}
        for name in sorted(f.name for f in self.path.iterdir() if _PART.match(f.name)):
            t = pq.read_table(self.path / name, columns=["finish_reason", "prompt_tokens", "output_tokens"])
            out["rows"] += t.num_rows
            out["error"] += sum(1 for r in t.column("finish_reason").to_pylist() if r == "error")
            out["prompt_tokens"] += sum(v or 0 for v in t.column("prompt_tokens").to_pylist())
            out["output_tokens"] += sum(v or 0 for v in t.column("output_tokens").to_pylist())
        return out

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest of a job that did not finish (``complete`` false): no success marker."""
        write_atomic(self.path / MANIFEST, dumps(manifest))

    def commit(self, manifest: dict[str, Any]) -> None:
        """Flush what is left, then write the manifest and the success marker, in that order. A job with no
        rows at all still gets one (empty) part, so readers find the schema."""
        self.flush()
        if not any(_PART.match(f.name) for f in self.path.iterdir()):
            self._write_part(self.schema.empty_table())
        write_atomic(self.path / MANIFEST, dumps(manifest))
        write_atomic(self.path / SUCCESS, b"")


def build_manifest(job: dict[str, Any], totals: dict[str, int], *, this_run: int, from_earlier_runs: int,
                   model: dict[str, Any], engine: str, source: Any, timings: dict[str, float],
                   kv: dict[str, int | None], complete: bool = True, **extra: Any) -> dict[str, Any]:
    """The ``_manifest.json`` document. ``job``: the job file's record (``_batchrun_job.json``); ``totals``:
    ``Sink.totals()``; ``source``: the ``batchrun.io.source.Source`` read; ``extra``: more top-level keys
    (``stopped_by``)."""
    return {
        "job": job["job"],
        "complete": complete,
        "spec_hash": job["spec_hash"],
        "results_hash": job["results_hash"],
        "spec": job["spec"],
        "model": model,
        "engine": engine,
        "kv": kv,
        "input": {"files": [asdict(f) for f in source.files], "id_column": source.id_column,
                  "generated_id": source.generated_id},
        "rows": {"total": totals["rows"], "ok": totals["rows"] - totals["error"], "error": totals["error"],
                 "this_run": this_run, "from_earlier_runs": from_earlier_runs},
        "tokens": {"prompt": totals["prompt_tokens"], "output": totals["output_tokens"]},
        "timings": timings,
        "versions": versions(),
        "finished_at": utc_now(),
        **extra,
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"batchrun": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "duckdb", "pyarrow", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def is_batchrun_file(name: str) -> bool:
    """Files batchrun writes in an output directory (the only ones it ever deletes)."""
    return bool(_PART.match(name)) or name in (JOB_FILE, MANIFEST, SUCCESS, LOCK) or (
        name.startswith(".") and name.endswith(".tmp"))


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
