"""The output dataset: Parquet part files written as results arrive, then a manifest and a success marker.

A ``Sink`` owns one output directory (a local directory, or an ``s3://``/``gs://`` prefix) for the length of
a job: it locks it (an OS lock locally, a lease on an object store: ``batchrun.io.lease``), decides from what
the directory holds whether the job starts, resumes, is already done or is refused, and writes the parts,
the manifest and ``_SUCCESS``, in that order. The layout and the reading of a directory (``read_state``:
ownership, foreign files, damage) live in ``batchrun.io.outdir``, the storage itself (link-safe local files,
whole objects) in ``batchrun.io.store``; this module knows the result columns and the manifest, not how damage
is detected. Readers: ``duckdb "SELECT * FROM 'out/job/*.parquet'"`` or ``polars.read_parquet('out/job/')``.
"""

from __future__ import annotations

import collections
import errno
import json
import operator
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrun.errors import SpecError, TemporaryFailure
from batchrun.io.lease import Lease
from batchrun.io.outdir import (  # (build_manifest, utc_now: the records, re-exported for the job's use)
    JOB_FILE,
    LEASE,
    LOCK,
    MANIFEST,
    PART,
    SUCCESS,
    OutputState,
    build_manifest,
    dumps,
    is_temp_file,
    part_name,
    read_state,
    short_error,
    utc_now,
    versions,
)
from batchrun.io.store import open_store

__all__ = ["RESULT_FIELDS", "Sink", "build_manifest", "output_schema", "utc_now", "versions"]

_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

RESULT_FIELDS = [
    pa.field("output", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
]
OUTPUT_JSON = pa.field("output_json", pa.string())  # with a json_schema constraint: the parsed output, as JSON
SAMPLE = pa.field("sample", pa.int32())  # with sampling.n > 1 (first of the results): which sample, 0 .. n-1
RESULT_COLUMNS = [f.name for f in RESULT_FIELDS]
TOKEN_LOGPROBS = pa.field("token_logprobs", pa.list_(pa.float32()))  # with sampling.logprobs: one per token
TOKENS = pa.field("tokens", pa.list_(pa.string()))  # with sampling.logprobs: each output token's text
TOP_LOGPROBS = pa.field("top_logprobs", pa.list_(pa.list_(pa.struct(  # with sampling.logprobs > 0
    [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]))))
CHOICE_PROBS = pa.field("choice_probs", pa.map_(pa.string(), pa.float64()))  # with a choices constraint
BATCHPROMPT_FIELDS = [  # with mode: batchprompt (``output`` holds the label)
    pa.field("votes", pa.map_(pa.string(), pa.float64())),  # weighted votes per label (free answers: per answer)
    pa.field("label_probs", pa.map_(pa.string(), pa.float64())),  # mean probability per label over the answers
    pa.field("confidence", pa.float64()),  # the chosen label's mean probability (free answers: its vote share)
    pa.field("rounds", pa.int32()),  # rounds the row took part in (SEAS may stop it early)
    pa.field("prompts", pa.list_(pa.int32())),  # the prompts it appeared in (numbered across rounds from 0)
    pa.field("fallback", pa.bool_()),  # answered by a single-item prompt (no valid answer in any round)
]
RESERVED_COLUMNS = [*RESULT_COLUMNS, OUTPUT_JSON.name, TOKEN_LOGPROBS.name, TOP_LOGPROBS.name, CHOICE_PROBS.name]
# (no input column may take these names)


def output_schema(input_schema: pa.Schema, id_column: str, columns: list[str],
                  results: list[pa.Field] = RESULT_FIELDS) -> pa.Schema:
    """The parts' columns: the id, the passthrough ``columns`` (types as in the input), then the results."""
    return pa.schema([input_schema.field(id_column)] + [input_schema.field(c) for c in columns] + results)


def _listing(names: list[str], most: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _not_writable(path: Path, e: OSError) -> SpecError | TemporaryFailure:
    if e.errno in _NOT_WRITABLE:
        return SpecError(f"output.path: {path} is not writable ({e.strerror or e}); make it writable or choose "
                         "another output.path")
    return TemporaryFailure(f"output.path: cannot create or write {path}: {e.strerror or e}; fix the cause "
                            "(free space) and rerun")


# ---------------------------------------------------------------------------------------------- the sink


class Sink:
    """Owns one output directory for the length of a job: lock, checks, parts, manifest, success marker.

    The order of a job: ``open`` (lock; read and check the directory: refuses files batchrun did not write
    and damage, writes nothing), ``check_job`` (this job's results or another's; the ids already committed),
    then ``begin`` (the first write), ``add``/``flush``, and ``write_manifest`` or ``commit``.
    ``path``: a local directory, or ``s3://bucket/prefix`` / ``gs://bucket/prefix``."""

    def __init__(self, path: str | Path, part_rows: int):
        self.store = open_store(path)
        self.path = self.store.where  # (a Path locally, the URL on an object store)
        self.schema: pa.Schema | None = None
        self.part_rows = part_rows
        self.state: OutputState | None = None
        self.exclusive = False  # False: only read (a finished job: works on a read-only disk), nothing locked
        self._buffers: dict[int | None, list[tuple[int, dict[str, Any]]]] = {}  # per shard: (input row, values)
        self._flushed: dict[int | None, float] = {}  # per shard: when its buffer was last written
        self._input: pa.Table | None = None  # the id and passthrough columns, never converted to Python
        self._next_part = 0
        self._parts: dict[str, dict[str, int]] = {}  # committed parts: {"rows", "bytes"}
        self._lock_fd: int | None = None
        self._lease: Lease | None = None
        self.rows_written = 0
        self.last_flush = time.monotonic()

    # -- lifetime ------------------------------------------------------------------------------------

    def open(self, fresh: bool) -> OutputState:
        """Lock the directory and read it. A directory that looks finished or damaged (and no ``fresh``) is
        only read: shared lock, nothing created. Raises SpecError (78) for a path that cannot be a directory, files
        batchrun did not write, links or damage (``fresh`` rebuilds damage); TemporaryFailure (75) if locked."""
        problem = self.store.problem()
        if problem:
            raise SpecError(problem)
        damaged = False
        if self.store.kind() == "dir":  # someone else's files: refused before even a lock file is created
            self.state = read_state(self.store)
            self._check_foreign()
            damaged = self.state.damaged
        # Only read (shared lock, nothing created) what looks finished or damaged, unless rebuilding it.
        exclusive = fresh or not (damaged or (self.state is not None and self.store.exists(SUCCESS)))
        if self.store.remote:
            self._take_lease(exclusive)
        else:
            self._lock(exclusive=exclusive, fresh=fresh)
        self.state = read_state(self.store)
        self._check_foreign()
        if self.state.problems and self.state.owned and not fresh:
            raise self._damaged(self.state.problems)
        return self.state

    def _take_lease(self, exclusive: bool) -> None:
        lease = Lease(self.store, LEASE)
        if not exclusive:
            lease.refuse_if_held()  # a writer there now: the finished job may be being rebuilt
            return
        lease.acquire()
        self._lease = lease
        self.exclusive = True

    def _lock(self, exclusive: bool, fresh: bool) -> None:
        if exclusive:
            try:
                self.store.make()
            except OSError as e:
                raise _not_writable(self.path, e) from None
        try:
            fd = self.store.flock(LOCK, exclusive)
        except BlockingIOError:
            raise TemporaryFailure(f"output {self.path} is locked by another batchrun process; "
                                   "retry when it has finished") from None
        except OSError as e:
            if e.errno != errno.ELOOP and not os.path.islink(self.path / LOCK):
                if not exclusive:
                    return  # a finished directory without a lock file we can open is read unlocked
                if e.errno == errno.EISDIR:
                    raise SpecError(f"output.path: {self.path / LOCK} is not a regular file; remove it") from None
                raise _not_writable(self.path, e) from None
            st = read_state(self.store)
            if not (fresh and exclusive and st.owned and not st.foreign):
                raise SpecError(f"output.path: {self.path / LOCK} is a symbolic link; batchrun never follows links "
                                "in its output directory: remove it" + (
                                    ", or rerun with --fresh to rebuild the directory" if st.owned else "")) from None
            self.store.delete(LOCK)  # the link itself
            return self._lock(exclusive, fresh)
        self._lock_fd = fd
        self.exclusive = exclusive

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def _guard(self, fresh_read: bool = False) -> None:
        """On an object store, before a write: this run still holds the lease (``fresh_read``: read it again)."""
        if self._lease is not None:
            self._lease.check() if fresh_read else self._lease.ensure()

    def _check_foreign(self) -> None:
        st = self.state
        if st.foreign and not st.owned:
            raise SpecError(f"output.path: {self.path} holds files batchrun did not write "
                            f"({_listing(st.foreign)}); choose an empty or new directory")
        if st.foreign:
            raise SpecError(f"output.path: {self.path} holds files batchrun did not write ({_listing(st.foreign)}); "
                            "batchrun never deletes them, not even with --fresh: remove them, or choose another "
                            "output.path")

    def check_job(self, job: dict[str, Any], fresh: bool) -> set[Any]:
        """Check the directory against ``job`` (after ``open``); returns the ids already committed. A directory
        of another job is refused unless ``fresh``; a finished one (``state.complete``) returns no ids."""
        st = self.state
        if fresh:
            return set()
        if st.owned and st.job["results_hash"] != job["results_hash"]:
            raise SpecError(f"output.path: {self.path} holds results of a different job (the model, input, "
                            "prompt or sampling changed); rerun with --fresh to rebuild it, or choose another "
                            "output.path")
        if st.complete:
            return set()
        if not self.exclusive:  # it looked finished when we locked it; it changed since
            raise TemporaryFailure(f"output {self.path} changed while batchrun read it (another batchrun process?); "
                                   "rerun the same command")
        done: set[Any] = set()  # ids, or with n samples per input row (id, sample) pairs
        rows = 0
        id_col = job["id_column"]
        n = ((job.get("spec") or {}).get("sampling") or {}).get("n", 1)
        columns = [id_col, SAMPLE.name] if n > 1 else [id_col]
        for name in st.parts:
            try:
                t = self.store.read_table(name, columns)
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                raise self._damaged([f"{name}: cannot read its {' and '.join(columns)} column(s) "
                                     f"({short_error(e)})"]) from None
            ids = t.column(id_col).to_pylist()
            keys = list(zip(ids, t.column(SAMPLE.name).to_pylist())) if n > 1 else ids
            rows += len(keys)
            done.update(keys)
        if rows != len(done):
            raise self._damaged([f"the parts hold {rows - len(done)} duplicate id(s)" if n == 1 else
                                 f"the parts hold {rows - len(done)} duplicate (id, sample) pair(s)"])
        if n > 1:  # an input row is committed with all its samples (a part never splits them)
            samples = collections.Counter(i for i, _ in done)
            partial = sum(1 for c in samples.values() if c != n)
            if partial:
                raise self._damaged([f"the parts hold some but not all {n} samples of {partial} id(s)"])
            done = set(samples)
        self._parts = dict(st.part_info)
        self._next_part = max((int(PART.match(p).group(1)) + 1 for p in st.parts), default=0)
        return done

    def _damaged(self, problems: list[str]) -> SpecError:
        return SpecError(f"output.path: {self.path} is damaged; --fresh rebuilds it (its results are deleted and "
                         "computed again), or choose another output.path", problems)

    def begin(self, job: dict[str, Any], fresh: bool) -> None:
        """The job's first write (after every check): delete stale temporary files, with ``fresh`` batchrun's
        files (links unlinked, never followed), write the job file (new or rebuilt directory) and remove a
        success marker that no longer holds."""
        if not self.exclusive:
            raise TemporaryFailure(f"output {self.path} is not locked for writing; rerun the same command")
        self._guard()
        try:
            for name, _ in self.store.entries():
                if is_temp_file(name):
                    self.store.delete(name)
            if fresh:
                self._clear()
            if fresh or not self.state.owned:
                self.store.write(JOB_FILE, dumps(job))
            elif self.store.exists(SUCCESS):
                self.store.delete(SUCCESS)
        except OSError as e:
            raise _not_writable(self.path, e) from None

    def _clear(self) -> None:
        """Delete batchrun's files but the job file (replaced next) and the lock: the success marker first, so
        a crash half-way leaves an unfinished directory of the old job, never one that looks finished."""
        names = [name for name, _ in self.store.entries()]
        for group in ([SUCCESS], [MANIFEST], sorted(n for n in names if PART.match(n))):
            for name in group:
                if name in names:
                    self.store.delete(name)  # a link is removed itself, never its target
        self.store.sync()
        self._parts = {}
        self._next_part = 0

    # -- rows ----------------------------------------------------------------------------------------

    def set_schema(self, schema: pa.Schema, metadata: dict[str, Any], input_columns: pa.Table) -> None:
        """The parts' schema: ``input_columns``' columns (the id and the passthrough columns, copied as Arrow
        data, whatever their type) then the result columns; ``metadata`` goes into each part's Parquet
        key-value metadata (``batchrun``)."""
        self.schema = schema.with_metadata({b"batchrun": json.dumps(metadata, sort_keys=True).encode()})
        self._input = input_columns

    def add(self, row: int, values: dict[str, Any], flush_after_s: float = 30.0, shard: int | None = None) -> None:
        """Buffer one finished output row: input row ``row``'s columns and the result ``values``; write a part
        when ``part_rows`` are buffered or every ``flush_after_s``.

        The output rows of one input row (its samples: ``values`` has a ``sample``) are added one after
        another, and a part never splits them: they are written once the next input row's first one comes
        (or at ``flush``), so resume, which works on input rows, finds each input row whole or absent.
        ``shard`` (a multi-worker job: the row's shard): rows of different shards never share a part; each
        shard has its own buffer and its parts are named ``part-NNNNNN-sSSSS.parquet``."""
        if shard is not None:
            shard = operator.index(shard)  # (a numpy integer too)
            if shard < 0:
                raise ValueError(f"shard must be a non-negative integer (got {shard})")
        buffer = self._buffers.setdefault(shard, [])
        self._flushed.setdefault(shard, time.monotonic())
        samples = SAMPLE.name in values
        if samples and buffer and row != buffer[-1][0] and self._due(shard, flush_after_s):
            self._flush(shard)
        self._buffers[shard].append((row, values))
        if not samples and self._due(shard, flush_after_s):
            self._flush(shard)

    def _due(self, shard: int | None, flush_after_s: float) -> bool:
        return (len(self._buffers[shard]) >= self.part_rows
                or time.monotonic() - self._flushed[shard] >= flush_after_s)

    def flush(self) -> None:
        """Write every buffered row (every shard's), in parts of ``part_rows`` rows, or more where an input
        row's output rows (its samples) would otherwise be split."""
        for shard in list(self._buffers):
            self._flush(shard)
        self.last_flush = time.monotonic()

    def _flush(self, shard: int | None) -> None:
        buffer = self._buffers[shard]
        while buffer:
            end = min(self.part_rows, len(buffer))
            while end < len(buffer) and buffer[end][0] == buffer[end - 1][0]:
                end += 1
            rows = buffer[:end]
            self._write_part(self._table(rows), shard)
            buffer = self._buffers[shard] = buffer[end:]
            self.rows_written += len(rows)
        self._flushed[shard] = self.last_flush = time.monotonic()

    def _table(self, rows: list[tuple[int, dict[str, Any]]]) -> pa.Table:
        taken = self._input.take(pa.array([r for r, _ in rows], type=pa.int64()))
        n = taken.num_columns
        results = pa.Table.from_pylist([v for _, v in rows], schema=pa.schema(list(self.schema)[n:]))
        return pa.Table.from_arrays(taken.columns + results.columns, schema=self.schema)

    def _write_part(self, table: pa.Table, shard: int | None = None) -> None:
        """Write one part whole (locally under a temporary name, then renamed; on an object store one upload):
        a part exists only once it is complete. A write error (disk full, permissions, the store unreachable)
        leaves no part behind and keeps the rows buffered."""
        self._guard()
        name = part_name(self._next_part, shard)
        try:
            size = self.store.write_parquet(name, table)
        except OSError as e:
            raise TemporaryFailure(f"cannot write results to {self.path}: {e}; the rows written before are kept: "
                                   "fix the cause (free space, permissions) and rerun to resume") from None
        self._parts[name] = {"rows": table.num_rows, "bytes": size}
        self._next_part += 1

    def parts(self) -> list[dict[str, Any]]:
        """The committed parts (earlier runs' and this run's), as the manifest lists them."""
        return [{"name": n, **self._parts[n]} for n in sorted(self._parts)]

    def totals(self) -> dict[str, int]:
        """Counts over every committed part (this run's and earlier runs')."""
        out = {"rows": 0, "error": 0, "prompt_tokens": 0, "output_tokens": 0}
        for name in sorted(self._parts):
            t = self.store.read_table(name, ["error", "prompt_tokens", "output_tokens"])
            out["rows"] += t.num_rows
            out["error"] += t.num_rows - t.column("error").null_count  # (an error, also beside an output)
            out["prompt_tokens"] += sum(v or 0 for v in t.column("prompt_tokens").to_pylist())
            out["output_tokens"] += sum(v or 0 for v in t.column("output_tokens").to_pylist())
        return out

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest of a job that did not finish (``complete`` false): no success marker."""
        self._guard(fresh_read=True)
        self.store.write(MANIFEST, dumps({**manifest, "parts": self.parts()}))

    def commit(self, manifest: dict[str, Any]) -> None:
        """Flush what is left, then write the manifest (with the list of parts) and the success marker, in that
        order. A job with no rows at all still gets one (empty) part, so readers find the schema. On an object
        store the lease is read again before each of the two: a run that lost it writes neither."""
        self.flush()
        if not self._parts:
            self._write_part(self.schema.empty_table())
        self._guard(fresh_read=True)
        self.store.write(MANIFEST, dumps({**manifest, "parts": self.parts()}))
        self._guard(fresh_read=True)
        self.store.write(SUCCESS, b"")
