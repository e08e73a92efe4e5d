"""Read the job's input table through DuckDB into Arrow.

Files (one, a glob, or a list; Parquet, CSV, JSON/JSONL) become a view named ``input.table``; ``input.sql``
may query it. The result must carry a unique, non-null id column, or batchrun adds ``row_id``: the 0-based
position of the row in the source (files in the order given, a glob's matches sorted by path, rows in file
order; with SQL, the query's order, so give it an ORDER BY or an id).
The job's SQL must be one SELECT query, and it runs in a confined DuckDB: it can read the input files (local
paths and file:// URLs, or remote URLs of the schemes in ``spec.REMOTE_SCHEMES``, each confined to the files
named, or for a glob to its directory prefix; objects of an object store, s3:// and gs://, are read through
pyarrow instead, ``io/object_input.py``, and DuckDB then reads no file at all) and nothing else: no other
file, no COPY/ATTACH/INSTALL/LOAD/SET/PRAGMA, no extension installs, and the configuration is locked so none
of this can be turned off.
This module owns its DuckDB connection and knows nothing of models.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from batchrun.errors import InputDataError, SpecError
from batchrun.io import object_input
from batchrun.spec import InputSpec, file_url_path, url_scheme

GENERATED_ID = "row_id"

_FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "csv", ".txt": "csv",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
}
_READERS = {
    "parquet": "read_parquet({files}, union_by_name = true)",
    "csv": "read_csv({files}, union_by_name = true)",
    "json": "read_json_auto({files}, union_by_name = true)",
}


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """The input rows (Arrow) and where they came from."""

    table: pa.Table
    id_column: str
    generated_id: bool
    files: list[FileStat] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def resolve_files(spec: InputSpec) -> list[str]:
    """Expand globs (each glob's matches sorted); every entry must match at least one file.
    Returns the paths in the order given, without duplicates."""
    out: list[str] = []
    for entry in spec.paths:
        scheme = url_scheme(entry)
        if scheme == "file":  # DuckDB reads file:// locally: it is a local path, confined like one
            entry = file_url_path(entry)
        elif object_input.is_object_input(entry):  # an object store: listed (globs matched) through pyarrow.fs
            out.extend(object_input.expand(scheme + entry[len(scheme):]))
            continue
        elif scheme:  # another remote URL (spec.py allows only REMOTE_SCHEMES): DuckDB's extension resolves it
            out.append(scheme + entry[len(scheme):])
            continue
        if any(c in entry for c in "*?[") and not os.path.isfile(entry):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputDataError(f"input.path: no file matches {entry!r} (from {os.getcwd()})")
            out.extend(matches)
        elif os.path.isdir(entry):
            raise InputDataError(f"input.path: {entry!r} is a directory; name files or a glob such as "
                                 f"'{entry.rstrip('/')}/*.parquet'")
        elif not os.path.isfile(entry):
            raise InputDataError(f"input.path: file not found: {entry!r} (from {os.getcwd()})")
        else:
            out.append(entry)
    return list(dict.fromkeys(out))


def detect_format(files: list[str], declared: str) -> str:
    if declared != "auto":
        return declared
    found = set()
    for f in files:
        name = f.lower().removesuffix(".gz").removesuffix(".zst")
        ext = os.path.splitext(name)[1]
        if ext not in _FORMATS:
            raise SpecError(f"input.format: cannot tell the format of {f!r} from its extension; "
                            "set input.format to parquet, csv or json")
        found.add(_FORMATS[ext])
    if len(found) > 1:
        raise SpecError(f"input.format: input.path mixes formats ({', '.join(sorted(found))}); "
                        "use files of one format, or set input.format")
    return found.pop()


def read_source(spec: InputSpec) -> Source:
    files = resolve_files(spec)
    fmt = detect_format(files, spec.format)
    if fmt == "openai_batch":
        return _read_batch_file(spec, files)
    located = [f if url_scheme(f) else os.path.abspath(f) for f in files]
    objects = [f for f in files if object_input.is_object_input(f)]
    if objects and len(objects) != len(files):
        raise SpecError("input.path: objects of an object store and other files together; use one or the other")
    data = object_input.dataset(objects, fmt) if objects else None
    # DuckDB keeps its spill directory writable under the confinement: make it a private, empty one.
    spill = tempfile.mkdtemp(prefix="batchrun-duckdb-")
    con = duckdb.connect(":memory:", config={"temp_directory": spill})
    try:
        try:
            if data is not None:  # objects: DuckDB scans the Arrow dataset; it reads no file itself
                con.register(spec.table, data)
                _confine(con, [])
            else:
                # Binding the view reads the files' schema (and loads the extension a remote scheme needs,
                # while that is still allowed); only our own literal file list is read before the confinement.
                reader = _READERS[fmt].format(files=_sql_list(located))
                con.execute(f'CREATE VIEW "{spec.table}" AS SELECT * FROM {reader}')
                _confine(con, located)
        except duckdb.Error as e:
            raise InputDataError(f"input.path: cannot read {fmt} input: {_first_line(e)}") from None
        if spec.sql:
            check_sql(con, spec.sql)
        query = spec.sql if spec.sql else f'SELECT * FROM "{spec.table}"'
        try:
            table = con.sql(query).to_arrow_table()
        except duckdb.Error as e:
            field_name = "input.sql" if spec.sql else "input.path"
            raise InputDataError(f"{field_name}: {_first_line(e)}", _rest_lines(e)) from None
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    table = table.combine_chunks() if table.num_columns else table
    stats = [file_stat(f) for f in files]
    if spec.id is None:
        if GENERATED_ID in table.column_names:
            raise InputDataError(f"input.id: the input already has a column named {GENERATED_ID!r}; set input.id to it "
                                 "(or to another unique column)")
        ids = pa.array(range(table.num_rows), type=pa.int64())
        return Source(table.append_column(GENERATED_ID, ids), GENERATED_ID, True, stats)
    require_columns(table, [spec.id], "input.id")
    check_ids(table, spec.id)
    return Source(table, spec.id, False, stats)


def _read_batch_file(spec: InputSpec, files: list[str]) -> Source:
    """OpenAI Batch API JSONL (``io.openai_batch``): parsed line by line (a bad line is a row with its error),
    then ``input.sql``, if any, over it in the same confined DuckDB. The id is ``custom_id``."""
    from batchrun.io.openai_batch import read_requests

    remote = [f for f in files if url_scheme(f)]
    if remote:
        raise SpecError(f"input.path: openai_batch files must be local ({remote[0]!r} is not)")
    try:
        table = read_requests(files)
    except OSError as e:
        raise InputDataError(f"input.path: cannot read {e.filename}: {e.strerror}") from None
    if spec.sql:
        con = duckdb.connect(":memory:")
        try:
            con.register(spec.table, table)
            _confine(con, [])
            check_sql(con, spec.sql)
            try:
                table = con.sql(spec.sql).to_arrow_table().combine_chunks()
            except duckdb.Error as e:
                raise InputDataError(f"input.sql: {_first_line(e)}", _rest_lines(e)) from None
        finally:
            con.close()
        require_columns(table, ["custom_id"], "input.sql")
    check_ids(table, "custom_id")
    return Source(table, "custom_id", False, [file_stat(f) for f in files])


def _confine(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """The job's SQL may read the input files and nothing else: no other file or URL, no COPY/EXPORT/ATTACH,
    no extension installs or loads, and (once the configuration is locked) no way to turn this off.

    ``files`` are absolute local paths (globs already expanded) and remote URLs; a remote glob allows its
    directory prefix (the part before the first wildcard, up to its last '/')."""
    paths = [f for f in files if not (url_scheme(f) and any(c in f for c in "*?["))]
    prefixes = sorted({_glob_prefix(f) for f in files if f not in paths})
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET allowed_paths = " + _sql_list(paths))
    if prefixes:
        con.execute("SET allowed_directories = " + _sql_list(prefixes))
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _glob_prefix(url: str) -> str:
    head = url[: min(url.index(c) for c in "*?[" if c in url)]
    return head[: head.rindex("/") + 1]


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in items) + "]"


def check_sql(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """``input.sql`` must be exactly one SELECT query (FROM-first, WITH, VALUES, DESCRIBE, SUMMARIZE are
    SELECTs too): batchrun's SQL only reads. This holds even where DuckDB's file confinement would allow a
    statement (a COPY into a remote prefix the input was read from, say). Raises InputDataError (exit 65)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise InputDataError(f"input.sql: {_first_line(e)}", _rest_lines(e)) from None
    kinds = [st.type.name for st in statements]
    if kinds == ["SELECT"]:
        return
    got = ("no statement" if not kinds else kinds[0] if len(kinds) == 1 else
           f"{len(kinds)} statements: {', '.join(kinds[:5])}{', ...' if len(kinds) > 5 else ''}")
    raise InputDataError(f"input.sql: must be one SELECT query; batchrun's SQL only reads (got {got})")


def require_columns(table: pa.Table, columns: list[str], field_name: str) -> None:
    """Raise InputDataError naming every column ``field_name`` needs that the input lacks."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise InputDataError(f"{field_name}: the input has no column {names} "
                             f"(columns: {', '.join(table.column_names) or 'none'})")


def check_ids(table: pa.Table, id_column: str) -> None:
    col = table.column(id_column)
    if pa.types.is_floating(col.type) or pa.types.is_nested(col.type):
        raise InputDataError(f"input.id: column {id_column!r} has type {col.type}; ids must be integers "
                             "or strings")
    nulls = col.null_count
    if nulls:
        first = pc.index(pc.is_null(col), True).as_py()
        raise InputDataError(f"input.id: column {id_column!r} has {nulls} null id(s); the first is at row "
                             f"{first} (0-based)")
    counts = pc.value_counts(col)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        shown = ", ".join(f"{v['values']!r} ({v['counts']} times)" for v in dup.to_pylist()[:5])
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise InputDataError(f"input.id: column {id_column!r} has {len(dup)} duplicated id(s): {shown}{more}")


def file_stat(path: str) -> FileStat:
    """Path, size and modification time (-1 for a path that cannot be read), to fingerprint inputs."""
    if object_input.is_object_input(path):
        return FileStat(path, *object_input.stats(path))
    try:
        st = os.stat(path)
        return FileStat(path, st.st_size, st.st_mtime_ns)
    except OSError:
        return FileStat(path, -1, -1)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rest_lines(e: Exception) -> list[str]:
    return [line for line in str(e).strip().splitlines()[1:] if line.strip()]
