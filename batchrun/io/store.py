"""Where an output dataset lives: a local directory or a prefix on an object store, behind one small interface.

``open_store(path)`` gives a ``LocalStore`` for a local path, or an ``ObjectStore`` for ``s3://bucket/prefix``
or ``gs://bucket/prefix`` (through ``pyarrow.fs``: credentials, region and endpoint from the usual
environment; ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` point it at an S3-compatible server). Both list
the entries directly under the location, read and write whole files by name, read Parquet metadata and
columns, and delete. A write is all or nothing: locally a new temporary file (created exclusively, never
through a symbolic link), synced, then renamed; on an object store one object, built in memory and sent in
one upload that only appears when complete.

Local files are opened with ``O_NOFOLLOW``, so a symbolic link planted in the directory is never followed;
object stores have no links, so that concern does not exist there. This module knows no file names of the
layout and takes no locks but the one it is asked for (``LocalStore.flock``); the layout, what a sound output
looks like, and the lease used on object stores live in ``outdir``, ``sink`` and ``lease``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import SpecError, TemporaryFailure
from batchrun.spec import OUTPUT_SCHEMES, url_scheme

FILE, LINK, OTHER = "file", "link", "other"  # kinds of an entry (OTHER: a directory, a device, a sub-prefix)


def is_object_url(path: str | Path) -> bool:
    return url_scheme(str(path)) in OUTPUT_SCHEMES


def open_store(path: str | Path) -> LocalStore | ObjectStore:
    return ObjectStore(str(path)) if is_object_url(path) else LocalStore(path)


# ---------------------------------------------------------------------------------------------- local


class LocalStore:
    """A local directory; entries are never followed through symbolic links."""

    remote = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = self.path  # what messages name

    def name(self, name: str) -> str:
        return str(self.path / name)

    def problem(self) -> str | None:
        """Why the path can never be an output directory (it, or a directory above it, is a file), or None."""
        p = self.path
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

    def kind(self) -> str:
        """"dir", "file" (anything but a directory) or "missing"."""
        try:
            return "dir" if stat.S_ISDIR(os.stat(self.path).st_mode) else "file"
        except (FileNotFoundError, NotADirectoryError):
            return "missing"
        except OSError as e:
            raise _unreadable(self.path, e) from None

    def entries(self) -> list[tuple[str, str]]:
        """(name, kind) of every entry, sorted by name; kind FILE (a regular file), LINK or OTHER."""
        try:
            names = sorted(os.listdir(self.path))
        except OSError as e:
            raise _unreadable(self.path, e) from None
        out = []
        for name in names:
            try:
                mode = os.lstat(self.path / name).st_mode
            except FileNotFoundError:
                continue
            out.append((name, LINK if stat.S_ISLNK(mode) else FILE if stat.S_ISREG(mode) else OTHER))
        return out

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path / name)

    def read(self, name: str) -> bytes:
        with open_read(self.path / name) as f:
            return f.read()

    def parquet_meta(self, name: str) -> tuple[pq.FileMetaData, int]:
        with open_read(self.path / name) as f:
            return pq.ParquetFile(f).metadata, os.fstat(f.fileno()).st_size

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        with open_read(self.path / name) as f:
            return pq.read_table(f, columns=columns)

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole or not at all (TemporaryFailure on a write error)."""
        write_atomic(self.path / name, data)

    def write_parquet(self, name: str, table: pa.Table) -> int:
        """Write ``table`` as ``name`` under a temporary name, then rename it; returns its bytes. Raises OSError
        and leaves nothing behind on a write error."""
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        try:
            with create_new(tmp) as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            os.replace(tmp, target)
            fsync_dir(self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return size

    def delete(self, name: str) -> None:
        """Delete ``name`` (a link is removed itself, never its target); a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / name)

    def make(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def sync(self) -> None:
        fsync_dir(self.path)

    def flock(self, name: str, exclusive: bool) -> int:
        """Open (``exclusive``: create) ``name`` without following a link and take a non-blocking flock on it;
        returns its descriptor. Raises OSError (ELOOP for a link) or BlockingIOError when another holds it."""
        import fcntl

        flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY)
        fd = os.open(self.path / name, flags, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _unreadable(path: Path, e: OSError) -> SpecError:
    return SpecError(f"output.path: cannot read {path}: {e.strerror or e}; fix its permissions or choose "
                     "another output.path")


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


# ---------------------------------------------------------------------------------------------- objects


class ObjectStore:
    """``s3://bucket/prefix`` or ``gs://bucket/prefix`` through ``pyarrow.fs``: the entries are the objects
    (and sub-prefixes) directly under ``prefix/``. Errors reaching the store are TemporaryFailure (75)."""

    remote = True

    def __init__(self, url: str):
        self.scheme = url_scheme(url)
        self.where = url.rstrip("/")  # what messages name
        rest = self.where[len(self.scheme) + 3:]
        self.bucket, _, self.prefix = rest.partition("/")
        self.root = rest  # the path pyarrow.fs takes: bucket/prefix
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = self._connect()
        return self._fs

    def _connect(self) -> Any:
        from pyarrow import fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        try:
            if self.scheme == "s3" and endpoint:  # an S3-compatible server: region as configured, no lookup
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
                return fs.S3FileSystem(endpoint_override=endpoint, region=region)
            return fs.FileSystem.from_uri(f"{self.scheme}://{self.bucket}")[0]
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot reach", e) from None

    def name(self, name: str) -> str:
        return f"{self.where}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _failure(self, what: str, e: BaseException, name: str | None = None) -> TemporaryFailure:
        target = self.name(name) if name else self.where
        return TemporaryFailure(f"{what} {target}: {_first_line(e)}; fix the cause (credentials, network, "
                                "endpoint) and rerun")

    def problem(self) -> str | None:
        """Why the URL can never be an output prefix (no prefix, no such bucket, an object there), or None."""
        if not self.bucket or not self.prefix:
            return (f"output.path: {self.where} names no prefix inside a bucket; use "
                    f"{self.scheme}://bucket/prefix")
        from pyarrow import fs

        try:
            if self.fs.get_file_info(self.bucket).type == fs.FileType.NotFound:
                return f"output.path: bucket {self.bucket!r} not found ({self.where}); create it or choose another"
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot reach", e) from None
        if self.kind() == "file":
            return f"output.path: {self.where} is an object, not a prefix; choose another output.path"
        return None

    def kind(self) -> str:
        """"dir" (objects under the prefix), "file" (an object named like the prefix) or "missing"."""
        from pyarrow import fs

        try:
            t = self.fs.get_file_info(self.root).type
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot read", e) from None
        return {fs.FileType.Directory: "dir", fs.FileType.File: "file"}.get(t, "missing")

    def entries(self) -> list[tuple[str, str]]:
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(self.root, recursive=False, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot list", e) from None
        return sorted((i.base_name, FILE if i.type == fs.FileType.File else OTHER) for i in infos)

    def exists(self, name: str) -> bool:
        from pyarrow import fs

        try:
            return self.fs.get_file_info(self._path(name)).type != fs.FileType.NotFound
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot read", e, name) from None

    def read(self, name: str) -> bytes:
        """The object's bytes: FileNotFoundError if there is none, TemporaryFailure if the store fails."""
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot read", e, name) from None

    # Parquet is read in place (only the footer, or the columns asked for, are fetched). A damaged file fails
    # the same way twice; a request that failed in transit (after pyarrow's own retries) rarely does.
    def parquet_meta(self, name: str) -> tuple[pq.FileMetaData, int]:
        def meta() -> tuple[pq.FileMetaData, int]:
            with self.fs.open_input_file(self._path(name)) as f:
                return pq.ParquetFile(f).metadata, f.size()

        return _twice(meta)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        def table() -> pa.Table:
            with self.fs.open_input_file(self._path(name)) as f:
                return pq.read_table(f, columns=columns)

        return _twice(table)

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        """One object, sent whole: it appears complete or not at all (TemporaryFailure on an error)."""
        try:
            stream = self.fs.open_output_stream(self._path(name))
            stream.write(data)  # the whole object at once: nothing half-written is ever completed
            stream.close()
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot write", e, name) from None

    def write_parquet(self, name: str, table: pa.Table) -> int:
        """Serialize the part in memory (a part is ``part_rows`` rows), then send it as one object."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        try:
            stream = self.fs.open_output_stream(self._path(name))
            stream.write(data)
            stream.close()
        except pa.ArrowException as e:
            raise OSError(_first_line(e)) from None
        return data.size

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._path(name))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as e:
            raise self._failure("cannot delete", e, name) from None

    def make(self) -> None:
        """Nothing to create: a prefix exists once an object is under it."""

    def sync(self) -> None:
        """Nothing to sync: each upload is durable once it returns."""


def _twice(read: Any) -> Any:
    try:
        return read()
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException):
        return read()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
