"""Input files on an object store (``s3://bucket/key``, ``gs://bucket/key``), read through pyarrow's filesystems.

DuckDB reads object stores only through its httpfs extension, which is not in the DuckDB wheel batchrun pins and
which no registry package provides for that version (an extension loads only into its own DuckDB version); a
job may not download one at run time. So batchrun lists and reads such files with ``pyarrow.fs`` (the same
filesystems, endpoint and credentials as an object-store output: ``io/store.py``) and hands DuckDB a
``pyarrow.dataset`` over them: the job's ``input.sql`` runs in DuckDB over that dataset as over local files
(columns and filters pushed down to the scan), with every file access of DuckDB's own still locked.

Globs (``s3://bucket/2026-*/part-*.parquet``) are matched against the objects under the glob's fixed prefix,
sorted by key. Each object's size and modification time go into the job's fingerprint, so a changed input is
a different job, as for local files.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import pyarrow as pa

from batchrun.errors import InputDataError, SpecError, TemporaryFailure
from batchrun.spec import url_scheme

SCHEMES = ("s3", "gs", "gcs")  # input read through pyarrow.fs (other URL schemes: DuckDB's own readers)
_FORMATS = {"parquet": "parquet", "csv": "csv", "json": "json"}


def is_object_input(entry: str) -> bool:
    return url_scheme(entry) in SCHEMES


def _store(url: str) -> Any:
    """The object store of ``url`` (its ``fs``: pyarrow's filesystem, set up as for output)."""
    from batchrun.io.store import ObjectStore

    scheme = url_scheme(url)
    return ObjectStore("gs" + url[len(scheme):] if scheme == "gcs" else url)


def _unreachable(what: str, url: str, e: BaseException) -> TemporaryFailure:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TemporaryFailure(f"input.path: {what} {url}: {first}; fix the cause (credentials, network, endpoint) "
                            "and rerun")


def _key_path(url: str) -> str:
    """``bucket/key``: the path pyarrow.fs takes."""
    return url[len(url_scheme(url)) + 3:]


def expand(entry: str) -> list[str]:
    """The objects ``entry`` names: itself (it must exist), or a glob's matches sorted by key."""
    from pyarrow import fs

    store = _store(entry)
    scheme = url_scheme(entry)
    path = _key_path(entry)
    try:
        if not any(c in path for c in "*?["):
            info = store.fs.get_file_info(path)
            if info.type != fs.FileType.File:
                raise InputDataError(f"input.path: no object {entry!r}")
            return [entry]
        head = path[: min(path.index(c) for c in "*?[" if c in path)]
        base = head[: head.rindex("/")] if "/" in head else head
        infos = store.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise _unreachable("cannot list", entry, e) from None
    matches = sorted(i.path for i in infos if i.type == fs.FileType.File and fnmatch.fnmatchcase(i.path, path))
    if not matches:
        raise InputDataError(f"input.path: no object matches {entry!r}")
    return [f"{scheme}://{m}" for m in matches]


def dataset(files: list[str], fmt: str) -> Any:
    """A ``pyarrow.dataset`` over ``files`` (objects of one store and format), columns united by name (a column
    missing from a file reads as nulls there), as DuckDB's ``union_by_name`` does for local files."""
    import pyarrow.dataset as ds

    if fmt not in _FORMATS:
        raise SpecError(f"input.format: {fmt} cannot be read from an object store (parquet, csv or json)")
    stores = {url_scheme(f) + "://" + _key_path(f).split("/", 1)[0] for f in files}
    if len(stores) > 1:
        raise SpecError(f"input.path: objects of one bucket only (got {', '.join(sorted(stores))})")
    store = _store(files[0])
    paths = [_key_path(f) for f in files]
    try:
        first = ds.dataset(paths, filesystem=store.fs, format=_FORMATS[fmt])
        schema = pa.unify_schemas([frag.physical_schema for frag in first.get_fragments()])
        return ds.dataset(paths, filesystem=store.fs, format=_FORMATS[fmt], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise InputDataError(f"input.path: cannot read {fmt} input: {str(e).strip().splitlines()[0]}") from None
    except (OSError, pa.ArrowException) as e:
        raise _unreachable("cannot read", files[0], e) from None


def stats(url: str) -> tuple[int, int]:
    """(size, modification time in ns) of an object; (-1, -1) if it cannot be read."""
    try:
        info = _store(url).fs.get_file_info(_key_path(url))
    except Exception:
        return -1, -1
    return (info.size if info.size is not None else -1), (info.mtime_ns if info.mtime_ns is not None else -1)
