"""What an output directory holds, read without writing: the layout's names and ``read_state``.

Layout of ``output.path`` (a local directory, or a prefix on an object store: ``batchrun.io.store``)::

    _batchrun_job.json   what job owns this directory (written first; used to resume or refuse)
    part-000000.parquet  result rows, in completion order; each part is complete once it has its name, and
                         carries the job's results hash in its Parquet key-value metadata (key ``batchrun``);
                         a multi-worker job names a part of shard s ``part-000000-s0003.parquet``
    _manifest.json       counts, timings, versions and the list of parts with their rows (written last but one)
    _SUCCESS             the job finished (written last)
    .lock                held (flock) while a job writes a local directory
    _lease.json          on an object store instead: who writes there, until when (``batchrun.io.lease``)

Locally every file is created new under a temporary name ``.<name>.tmp`` and renamed, so a crash never leaves
a file that looks committed, and a symbolic link planted in the directory is never followed (not even by
``--fresh``, which unlinks links themselves); on an object store each file is one object, uploaded whole.
The directory holds batchrun's files only: anything else, a part of another job, or a damaged file is found
by ``read_state``.

This module knows the names, what a sound directory looks like, and the records batchrun writes there (the
manifest's document: ``build_manifest``). It does not lock, decide what a job may do with what it finds
(resume, refuse, rebuild: ``batchrun.io.sink``), know how files are stored (``batchrun.io.store``), nor know
the result columns.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrun import __version__
from batchrun.io.store import FILE, LINK, LocalStore, ObjectStore, open_store

JOB_FILE = "_batchrun_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
LOCK = ".lock"
LEASE = "_lease.json"
PART = re.compile(r"^part-(\d{6,})(?:-s(\d{4,}))?\.parquet$")  # groups: sequence number, shard (or None)

Store = LocalStore | ObjectStore


# ---------------------------------------------------------------------------------------------- names


def part_name(seq: int, shard: int | None = None) -> str:
    """``part-NNNNNN.parquet``, or with a shard ``part-NNNNNN-sSSSS.parquet``."""
    return f"part-{seq:06d}.parquet" if shard is None else f"part-{seq:06d}-s{shard:04d}.parquet"


def lock_name(store: Store) -> str:
    """What guards a writer: an OS lock file locally, a lease object on an object store."""
    return LEASE if store.remote else LOCK


def is_batchrun_file(name: str) -> bool:
    """Names batchrun writes in an output directory (the only ones it ever deletes)."""
    return _is_own(name) or name in (LOCK, LEASE) or is_temp_file(name)


def _is_own(name: str) -> bool:
    return name in (JOB_FILE, MANIFEST, SUCCESS) or bool(PART.match(name))


def is_temp_file(name: str) -> bool:
    """``.<name>.tmp``: a file batchrun was writing (a crash can leave one; it is deleted, never read)."""
    return name.startswith(".") and name.endswith(".tmp") and _is_own(name[1:-4])


# ---------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class OutputState:
    """What an output directory holds right now (read by ``status`` and before a job starts; reads only)."""

    path: str
    exists: bool
    owned: bool  # it has a batchrun job file (a regular file; its content may still be damaged)
    complete: bool  # finished: _SUCCESS, a final manifest that lists exactly the parts, nothing damaged
    job: dict[str, Any] | None  # the job file, if readable
    manifest: dict[str, Any] | None  # the manifest, if readable
    parts: list[str] = field(default_factory=list)  # part files (names), readable or not
    rows: int = 0  # rows in the readable parts
    is_dir: bool = True
    part_info: dict[str, dict[str, int]] = field(default_factory=dict)  # readable parts: {"rows", "bytes"}
    foreign: list[str] = field(default_factory=list)  # entries batchrun did not write: never deleted
    problems: list[str] = field(default_factory=list)  # damage, one 'name: what is wrong' each

    @property
    def damaged(self) -> bool:
        return self.owned and bool(self.problems or self.foreign)


def path_problem(path: str | Path | Store) -> str | None:
    """Why ``path`` can never be an output directory (locally: it, or a directory above it, is a file; on an
    object store: no prefix, no such bucket, an object named like the prefix), or None."""
    return (path if isinstance(path, LocalStore | ObjectStore) else open_store(path)).problem()


def read_state(path: str | Path | Store) -> OutputState:
    """Read what ``path`` (a local directory, an object store URL, or a store) holds, never writing, never
    following a symbolic link inside it: ownership, the job file and manifest, every part's rows and batchrun
    metadata, files batchrun did not write, and damage."""
    store = path if isinstance(path, LocalStore | ObjectStore) else open_store(path)
    where = str(store.where)
    kind = store.kind()
    if kind != "dir":
        return OutputState(where, kind == "file", False, False, None, None, is_dir=False)
    lock = lock_name(store)

    own: list[str] = []  # regular files with batchrun's names
    links: list[str] = []  # symbolic links with batchrun's names (the lock's included)
    foreign: list[str] = []
    for name, what in store.entries():
        ours = _is_own(name) or name == lock
        if what == LINK and ours:
            links.append(name)
        elif is_temp_file(name) and what in (FILE, LINK):
            continue  # a stale temporary file or link: unlinked before the next write, never read
        elif not ours:
            foreign.append(name)
        elif what != FILE:
            foreign.append(f"{name} (not a regular file)")
        elif name != lock:
            own.append(name)

    if JOB_FILE not in own:  # not batchrun's: every entry but the lock and temporary names is foreign
        foreign += [f"{n} (a symbolic link)" if n in links else n for n in own + links if n != lock]
        problems = [f"{lock}: a symbolic link"] if lock in links else []
        return OutputState(where, True, False, False, None, None, foreign=sorted(foreign), problems=problems)

    problems = [f"{n}: a symbolic link (batchrun never follows links in its output directory)" for n in links]
    job = _read_json(store, JOB_FILE, problems, required=("results_hash", "id_column"))
    manifest = _read_json(store, MANIFEST, problems) if MANIFEST in own else None
    expected = job["results_hash"] if job else None
    parts = sorted(n for n in own if PART.match(n))
    info: dict[str, dict[str, int]] = {}
    for name in parts:
        try:
            md, size = store.parquet_meta(name)
            raw = (md.metadata or {}).get(b"batchrun")
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"{name}: damaged, not a readable Parquet file ({short_error(e)})")
            continue
        if raw is None:
            foreign.append(f"{name} (a Parquet file without batchrun's metadata)")
            continue
        try:
            meta = json.loads(raw)
            theirs = meta["results_hash"]
        except (ValueError, TypeError, KeyError):
            problems.append(f"{name}: damaged batchrun metadata")
            continue
        if expected is not None and theirs != expected:
            problems.append(f"{name}: a part of another job (results hash {theirs}; this directory's job has "
                            f"{expected})")
            continue
        info[name] = {"rows": md.num_rows, "bytes": size}

    listed = _manifest_parts(manifest, problems)
    if manifest is not None and expected is not None and manifest.get("results_hash") != expected:
        problems.append(f"{MANIFEST}: of another job (results hash {manifest.get('results_hash')}; this "
                        f"directory's job has {expected})")
    if listed is not None:  # every part the manifest lists must be there, as it was
        for name, want in listed.items():
            if name not in parts:
                problems.append(f"{name}: listed in {MANIFEST} but missing (its rows are lost)")
            elif name in info and info[name] != want:
                problems.append(f"{name}: {info[name]['rows']} rows, {info[name]['bytes']} bytes; {MANIFEST} "
                                f"lists {want.get('rows')} rows, {want.get('bytes')} bytes")
    has_success = SUCCESS in own or SUCCESS in links
    if has_success:
        if MANIFEST not in own and MANIFEST not in links:
            problems.append(f"{SUCCESS} without {MANIFEST}")
        elif manifest is not None:
            if manifest.get("complete") is not True:
                problems.append(f"{MANIFEST}: says the job is not complete, but {SUCCESS} exists")
            if listed is not None:
                problems += [f"{n}: not listed in {MANIFEST} of the finished job" for n in parts if n not in listed]
            elif (manifest.get("rows") or {}).get("total") != sum(i["rows"] for i in info.values()):
                problems.append(f"the parts hold {sum(i['rows'] for i in info.values())} rows; {MANIFEST} says "
                                f"{(manifest.get('rows') or {}).get('total')}")
    complete = has_success and manifest is not None and job is not None and not problems and not foreign
    return OutputState(where, True, True, complete, job, manifest, parts, sum(i["rows"] for i in info.values()),
                       part_info=info, foreign=sorted(foreign), problems=problems)


def _read_json(store: Store, name: str, problems: list[str], required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    try:
        obj = json.loads(store.read(name).decode("utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{name}: damaged, not readable JSON ({short_error(e)})")
        return None
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in required):
        problems.append(f"{name}: damaged, not batchrun's record")
        return None
    return obj


def _manifest_parts(manifest: dict[str, Any] | None, problems: list[str]) -> dict[str, dict] | None:
    """The manifest's parts ({name: {"rows", "bytes"}}); None if it lists none (written before manifests
    listed their parts: then only its row count is checked)."""
    if manifest is None or "parts" not in manifest:
        return None
    try:
        return {d["name"]: {"rows": d["rows"], "bytes": d["bytes"]} for d in manifest["parts"]}
    except (TypeError, KeyError):
        problems.append(f"{MANIFEST}: damaged list of parts")
        return None


def short_error(e: BaseException) -> str:
    """The first line of an error, at most 120 characters (for a problem list)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------- records


def build_manifest(job: dict[str, Any], totals: dict[str, int], *, this_run: int, from_earlier_runs: int,
                   model: dict[str, Any], engine: str, source: Any, timings: dict[str, float],
                   kv: dict[str, int | None], complete: bool = True, **extra: Any) -> dict[str, Any]:
    """The ``_manifest.json`` document (the sink adds ``parts`` when it writes it: each part's name, rows and
    bytes). ``job``: the job file's record (``_batchrun_job.json``); ``totals``: ``Sink.totals()``; ``source``:
    the ``batchrun.io.source.Source`` read; ``extra``: more top-level keys (``stopped_by``)."""
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


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
