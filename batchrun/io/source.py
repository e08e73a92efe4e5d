"""Read the job's input table through DuckDB into Arrow.

Files (one, a glob, or a list; Parquet, CSV, JSON/JSONL) become a view named ``input.table``; ``input.sql``
may query it. The result must carry a unique, non-null id column, or batchrun adds ``row_id``: the 0-based
position of the row in the source (files in the order given, a glob's matches sorted by path, rows in file
order; with SQL, the query's order, so give it an ORDER BY or an id).
The job's SQL runs in a confined DuckDB: it can read the input files and nothing else (no other files, no
COPY/ATTACH, no extensions; the configuration is locked). Remote URLs in input.path are left unconfined.
This module owns its DuckDB connection and knows nothing of models.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from batchrun.errors import InputDataError, SpecError
from batchrun.spec import InputSpec

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
        if "://" in entry:  # a URL: DuckDB resolves it (if its extension is available)
            out.append(entry)
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
    local = [f if "://" in f else os.path.abspath(f) for f in files]
    literal = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in local) + "]"
    con = duckdb.connect(":memory:")
    try:
        try:
            if not any("://" in f for f in local):
                _confine(con, local)
            con.execute(f'CREATE VIEW "{spec.table}" AS SELECT * FROM ' + _READERS[fmt].format(files=literal))
            con.execute("SET lock_configuration = true")
        except duckdb.Error as e:
            raise InputDataError(f"input.path: cannot read {fmt} input: {_first_line(e)}") from None
        query = spec.sql if spec.sql else f'SELECT * FROM "{spec.table}"'
        try:
            table = con.sql(query).to_arrow_table()
        except duckdb.Error as e:
            field_name = "input.sql" if spec.sql else "input.path"
            raise InputDataError(f"{field_name}: {_first_line(e)}", _rest_lines(e)) from None
    finally:
        con.close()
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


def _confine(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """The job's SQL may read the input files and nothing else: no other file, no COPY/EXPORT/ATTACH, no
    extension installs, and (once the configuration is locked) no way to turn this off."""
    con.execute("SET allowed_paths = " + "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]")
    con.execute("SET enable_external_access = false")


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
    try:
        st = os.stat(path)
        return FileStat(path, st.st_size, st.st_mtime_ns)
    except OSError:
        return FileStat(path, -1, -1)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rest_lines(e: Exception) -> list[str]:
    return [line for line in str(e).strip().splitlines()[1:] if line.strip()]
