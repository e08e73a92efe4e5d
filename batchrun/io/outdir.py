"""What an output directory holds, read without writing, and how files in it are opened and created.

Layout of ``output.path``::

    _batchrun_job.json   what job owns this directory (written first; used to resume or refuse)
    part-000000.parquet  result rows, in completion order; each part is complete once it has its name, and
                         carries the job's results hash in its Parquet key-value metadata (key ``batchrun``)
    _manifest.json       counts, timings, versions and the list of parts with their rows (written last but one)
    _SUCCESS             the job finished (written last)
    .lock                held (flock) while a job writes here

Every file is created new (``O_CREAT | O_EXCL | O_NOFOLLOW``, after unlinking a stale temporary name) under a
temporary name ``.<name>.tmp`` and renamed, so a crash never leaves a file that looks committed, and a
symbolic link planted in the directory is never followed (not even by ``--fresh``, which unlinks links
themselves). The directory holds batchrun's files only: anything else, a part of another job, or a damaged
file is found by ``read_state``.

This module knows the names, what a sound directory looks like, and the link-safe file primitives. It does
not lock, decide what a job may do with what it finds (resume, refuse, rebuild: ``batchrun.io.sink``), nor
know the result columns or what goes into a manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import SpecError, TemporaryFailure

JOB_FILE = "_batchrun_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
LOCK = ".lock"
PART = re.compile(r"^part-(\d{6,})\.parquet$")


# ---------------------------------------------------------------------------------------------- names


def is_batchrun_file(name: str) -> bool:
    """Names batchrun writes in an output directory (the only ones it ever deletes)."""
    return _is_own(name) or name == LOCK or is_temp_file(name)


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


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` can never be an output directory (it, or a directory above it, is a file), or None."""
    p = Path(path)
    if os.path.lexists(p):
        if os.path.isdir(p):
            return None
        what = "a broken symbolic link" if not os.path.exists(p) else "a file, not a directory"
        return f"output.path: {p} is {what}; choose another output.path"
    for parent in p.parents:
        if os.path.lexists(parent):
            if os.path.isdir(parent):
                return None
            return f"output.path: {p} cannot be a directory: {parent} is a file; choose another output.path"
    return None


def read_state(path: str | Path) -> OutputState:
    """Read what ``path`` holds, never writing, never following a symbolic link inside it: ownership, the job
    file and manifest, every part's rows and batchrun metadata, files batchrun did not write, and damage."""
    p = Path(path)
    try:
        if not stat.S_ISDIR(os.stat(p).st_mode):
            return OutputState(str(p), True, False, False, None, None, is_dir=False)
        names = sorted(os.listdir(p))
    except (FileNotFoundError, NotADirectoryError):
        return OutputState(str(p), False, False, False, None, None, is_dir=False)
    except OSError as e:
        raise SpecError(f"output.path: cannot read {p}: {e.strerror or e}; fix its permissions or choose "
                        "another output.path") from None

    own: list[str] = []  # regular files with batchrun's names
    links: list[str] = []  # symbolic links with batchrun's names (the lock's included)
    foreign: list[str] = []
    for name in names:
        try:
            mode = os.lstat(p / name).st_mode
        except FileNotFoundError:
            continue
        ours = _is_own(name) or name == LOCK
        if stat.S_ISLNK(mode) and ours:
            links.append(name)
        elif is_temp_file(name) and (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            continue  # a stale temporary file or link: unlinked before the next write, never read
        elif not ours:
            foreign.append(name)
        elif not stat.S_ISREG(mode):
            foreign.append(f"{name} (not a regular file)")
        elif name != LOCK:
            own.append(name)

    if JOB_FILE not in own:  # not batchrun's: every entry but the lock and temporary names is foreign
        foreign += [f"{n} (a symbolic link)" if n in links else n for n in own + links if n != LOCK]
        problems = [f"{LOCK}: a symbolic link"] if LOCK in links else []
        return OutputState(str(p), True, False, False, None, None, foreign=sorted(foreign), problems=problems)

    problems = [f"{n}: a symbolic link (batchrun never follows links in its output directory)" for n in links]
    job = _read_json(p / JOB_FILE, problems, required=("results_hash", "id_column"))
    manifest = _read_json(p / MANIFEST, problems) if MANIFEST in own else None
    expected = job["results_hash"] if job else None
    parts = sorted(n for n in own if PART.match(n))
    info: dict[str, dict[str, int]] = {}
    for name in parts:
        try:
            with open_read(p / name) as f:
                md = pq.ParquetFile(f).metadata
                size = os.fstat(f.fileno()).st_size
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
    return OutputState(str(p), True, True, complete, job, manifest, parts, sum(i["rows"] for i in info.values()),
                       part_info=info, foreign=sorted(foreign), problems=problems)


def _read_json(path: Path, problems: list[str], required: tuple[str, ...] = ()) -> dict[str, Any] | None:
    try:
        with open_read(path) as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: damaged, not readable JSON ({short_error(e)})")
        return None
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in required):
        problems.append(f"{path.name}: damaged, not batchrun's record")
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


# ---------------------------------------------------------------------------------------------- files


def open_read(path: Path) -> IO[bytes]:
    """Open a file for reading, never through a symbolic link (ELOOP)."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def create_new(path: Path) -> IO[bytes]:
    """A new file at ``path`` (a temporary name): a stale file or link there is unlinked first (a link is
    removed, never followed), then the file is created exclusively, never through a link."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (best effort: some filesystems cannot sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a new temporary file, synced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with create_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TemporaryFailure(f"cannot write {path}: {e}; fix the cause (free space, permissions) and rerun") from None
