"""batchrun.io.source: real files in tmp_path read through DuckDB; every input error with its message."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.errors import InputDataError, SpecError
from batchrun.io.source import read_source
from batchrun.spec import InputSpec


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, and "(from <cwd>)" in messages is tmp_path


def parquet(path: str, **cols) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def read(**kw):
    return read_source(InputSpec(**kw))


def input_error(**kw) -> InputDataError:
    with pytest.raises(InputDataError) as ei:
        read(**kw)
    assert ei.value.exit_code == 65
    return ei.value


def msg(**kw) -> str:
    return str(input_error(**kw))


# --------------------------------------------------------------------------------------------- formats


def test_parquet_with_id_column(tmp_path):
    parquet("r.parquet", id=["a", "b"], text=["x", "y"], n=pa.array([1, 2], pa.int32()))
    src = read(path="r.parquet", id="id")
    assert src.table.to_pylist() == [{"id": "a", "text": "x", "n": 1}, {"id": "b", "text": "y", "n": 2}]
    assert (src.id_column, src.generated_id, src.num_rows) == ("id", False, 2)
    assert [(f.path, f.size) for f in src.files] == [("r.parquet", os.path.getsize("r.parquet"))]


def test_csv_quoting_and_embedded_newline():
    with open("r.csv", "w") as f:
        f.write('id,text\n1,"hello, world"\n2,"line one\nline two"\n3,"say ""hi"""\n')
    src = read(path="r.csv", id="id")
    assert src.table.to_pylist() == [{"id": 1, "text": "hello, world"},
                                     {"id": 2, "text": "line one\nline two"}, {"id": 3, "text": 'say "hi"'}]
    assert src.table.schema.field("id").type == pa.int64()


def test_json_array_file():
    with open("r.json", "w") as f:
        json.dump([{"id": "x", "t": "a"}, {"id": "y", "t": "b"}], f)
    src = read(path="r.json", id="id")
    assert src.table.to_pylist() == [{"id": "x", "t": "a"}, {"id": "y", "t": "b"}]


def test_jsonl_gets_generated_row_id():
    with open("r.jsonl", "w") as f:
        f.write('{"t": "p", "n": 1}\n{"t": "q", "n": 2}\n')
    src = read(path="r.jsonl")
    assert src.table.to_pylist() == [{"t": "p", "n": 1, "row_id": 0}, {"t": "q", "n": 2, "row_id": 1}]
    assert (src.id_column, src.generated_id) == ("row_id", True)
    assert src.table.schema.field("row_id").type == pa.int64()


def test_declared_format_overrides_extension():
    with open("r.txt", "w") as f:
        f.write('{"t": "p"}\n')
    assert read(path="r.txt", format="json").table.to_pylist() == [{"t": "p", "row_id": 0}]


def test_glob_sorted_union_of_columns_and_row_ids():
    parquet("parts/p2.parquet", t=["c1", "c2"])
    parquet("parts/p1.parquet", t=["a1"], extra=[7])
    parquet("parts/p10.parquet", t=["b1"])
    src = read(path="parts/*.parquet")
    assert [f.path for f in src.files] == ["parts/p1.parquet", "parts/p10.parquet", "parts/p2.parquet"]
    assert src.table.to_pylist() == [
        {"t": "a1", "extra": 7, "row_id": 0}, {"t": "b1", "extra": None, "row_id": 1},
        {"t": "c1", "extra": None, "row_id": 2}, {"t": "c2", "extra": None, "row_id": 3}]


def test_list_of_paths_in_given_order_without_duplicates():
    parquet("b.parquet", t=["b"])
    parquet("a.parquet", t=["a"])
    src = read(path=["b.parquet", "a.parquet", "b.parquet"])
    assert [f.path for f in src.files] == ["b.parquet", "a.parquet"]
    assert src.table.to_pylist() == [{"t": "b", "row_id": 0}, {"t": "a", "row_id": 1}]


def test_glob_and_list_union_csv_columns():
    with open("a.csv", "w") as f:
        f.write("id,x\n1,u\n")
    with open("b.csv", "w") as f:
        f.write("id,y\n2,v\n")
    src = read(path=["a.csv", "b.csv"], id="id")
    assert src.table.to_pylist() == [{"id": 1, "x": "u", "y": None}, {"id": 2, "x": None, "y": "v"}]


def test_path_with_a_quote_in_its_name():
    parquet("o'brien.parquet", t=["q"])
    assert read(path="o'brien.parquet").table.to_pylist() == [{"t": "q", "row_id": 0}]


def test_existing_file_with_brackets_in_its_name():
    parquet("export [2024].parquet", t=["q"])
    assert read(path="export [2024].parquet").table.to_pylist() == [{"t": "q", "row_id": 0}]


def test_sql_over_default_table_and_row_id_in_query_order():
    parquet("r.parquet", t=["b", "a", "c"], keep=[True, True, False])
    src = read(path="r.parquet", sql="SELECT t FROM input WHERE keep ORDER BY t")
    assert src.table.to_pylist() == [{"t": "a", "row_id": 0}, {"t": "b", "row_id": 1}]


def test_sql_over_custom_table_name():
    parquet("r.parquet", t=["b", "a", "c"])
    src = read(path="r.parquet", table="docs", sql="SELECT upper(t) AS u FROM docs ORDER BY u DESC LIMIT 2")
    assert src.table.to_pylist() == [{"u": "C", "row_id": 0}, {"u": "B", "row_id": 1}]
    err = input_error(path="r.parquet", table="docs", sql="SELECT * FROM input")
    assert err.message.startswith("input.sql: Catalog Error: Table with name input does not exist!")


def test_empty_table_works():
    parquet("e.parquet", id=pa.array([], pa.string()), t=pa.array([], pa.string()))
    src = read(path="e.parquet", id="id")
    assert src.num_rows == 0 and src.table.column_names == ["id", "t"]
    src = read(path="e.parquet")
    assert src.num_rows == 0 and src.table.column_names == ["id", "t", "row_id"]
    parquet("r.parquet", t=["a"])
    assert read(path="r.parquet", sql="SELECT * FROM input WHERE false").table.column_names == ["t", "row_id"]


def test_existing_row_id_column_needs_input_id():
    parquet("r.parquet", row_id=[5, 6], t=["a", "b"])
    err = input_error(path="r.parquet")
    assert str(err) == ("input.id: the input already has a column named 'row_id'; set input.id to it "
                        "(or to another unique column)")
    src = read(path="r.parquet", id="row_id")
    assert src.table.to_pylist() == [{"row_id": 5, "t": "a"}, {"row_id": 6, "t": "b"}]
    assert src.generated_id is False


# ---------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    assert msg(path="nope.parquet") == f"input.path: file not found: 'nope.parquet' (from {tmp_path})"


def test_glob_with_no_match(tmp_path):
    assert msg(path="nope/*.parquet") == f"input.path: no file matches 'nope/*.parquet' (from {tmp_path})"


def test_one_missing_file_in_a_list_is_named(tmp_path):
    parquet("a.parquet", t=["a"])
    err = input_error(path=["a.parquet", "gone.csv"])
    assert str(err) == f"input.path: file not found: 'gone.csv' (from {tmp_path})"


def test_directory_given():
    os.mkdir("parts")
    assert msg(path="parts/") == ("input.path: 'parts/' is a directory; name files or a glob such as "
                                  "'parts/*.parquet'")


def test_unknown_extension_is_spec_error():
    open("x.xlsx", "w").close()
    with pytest.raises(SpecError) as ei:
        read(path="x.xlsx")
    assert ei.value.exit_code == 78
    assert str(ei.value) == ("input.format: cannot tell the format of 'x.xlsx' from its extension; set "
                             "input.format to parquet, csv or json")


def test_mixed_formats_is_spec_error():
    parquet("a.parquet", t=["a"])
    open("b.csv", "w").write("t\nb\n")
    with pytest.raises(SpecError) as ei:
        read(path=["a.parquet", "b.csv"])
    assert str(ei.value) == ("input.format: input.path mixes formats (csv, parquet); use files of one "
                             "format, or set input.format")


def test_unreadable_file():
    open("bad.parquet", "w").write("not parquet")
    assert input_error(path="bad.parquet").message.startswith("input.path: cannot read parquet input: ")


def test_missing_id_column_lists_available_columns():
    parquet("r.parquet", text=["a"], lang=["en"])
    expected = "input.id: the input has no column 'doc_id' (columns: text, lang)"
    assert msg(path="r.parquet", id="doc_id") == expected


def test_duplicate_ids_named_with_counts():
    parquet("r.parquet", id=[1, 2, 2, 3, 3, 3], t=list("abcdef"))
    expected = "input.id: column 'id' has 2 duplicated id(s): 2 (2 times), 3 (3 times)"
    assert msg(path="r.parquet", id="id") == expected
    parquet("s.parquet", id=["x", "y", "x"])
    assert msg(path="s.parquet", id="id") == "input.id: column 'id' has 1 duplicated id(s): 'x' (2 times)"
    parquet("m.parquet", id=list(range(7)) * 2)
    assert msg(path="m.parquet", id="id") == (
        "input.id: column 'id' has 7 duplicated id(s): 0 (2 times), 1 (2 times), 2 (2 times), 3 (2 times), "
        "4 (2 times) and 2 more")


def test_null_ids():
    parquet("r.parquet", id=["a", None, "c", None])
    assert msg(path="r.parquet", id="id") == ("input.id: column 'id' has 2 null id(s); the first is at row 1 "
                                              "(0-based)")


def test_float_id_column_refused():
    parquet("r.parquet", id=[1.0, 2.0])
    assert msg(path="r.parquet", id="id") == ("input.id: column 'id' has type double; ids must be integers "
                                              "or strings")


def test_sql_syntax_error_mentions_input_sql():
    parquet("r.parquet", t=["a"])
    err = input_error(path="r.parquet", sql="SELEC * FROM input")
    assert err.message == 'input.sql: Parser Error: syntax error at or near "SELEC"'
    assert err.problems[0] == "LINE 1: SELEC * FROM input"
    err = input_error(path="r.parquet", sql="SELECT nope FROM input")
    assert err.message == 'input.sql: Binder Error: Referenced column "nope" not found in FROM clause!'


@pytest.mark.parametrize("sql, fragment", [
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM read_parquet('secret.parquet')", "Permission Error"),
    ("SELECT * FROM 'file:///etc/passwd'", "does not exist"),
    ("SELECT * FROM read_text('file:///etc/hostname')", "Permission Error"),
    ("COPY (SELECT * FROM input) TO 'leak.csv'", "must be one SELECT query; batchrun's SQL only reads (got COPY)"),
    ("SELECT * FROM input; SET enable_external_access = true",
     "must be one SELECT query; batchrun's SQL only reads (got 2 statements: SELECT, SET)"),
])
def test_job_sql_cannot_reach_other_files(sql, fragment):
    parquet("r.parquet", t=["a"])
    parquet("secret.parquet", t=["s"])
    err = input_error(path="r.parquet", sql=sql)
    assert err.exit_code == 65 and err.message.startswith("input.sql: ") and fragment in str(err)
    assert not os.path.exists("leak.csv")


# ------------------------------------------------------------------------------- URLs and confinement


def test_file_urls_are_local_paths(tmp_path):
    parquet("r.parquet", t=["a", "b"])
    parquet("parts/p1.parquet", t=["c"])
    for url in (f"file://{tmp_path}/r.parquet", f"file://localhost{tmp_path}/r.parquet",
                f"FILE://{tmp_path}/r.parquet"):
        src = read(path=url)
        assert src.table.to_pylist() == [{"t": "a", "row_id": 0}, {"t": "b", "row_id": 1}]
        assert [(f.path, f.size) for f in src.files] == [(f"{tmp_path}/r.parquet", os.path.getsize("r.parquet"))]
    src = read(path=f"file://{tmp_path}/parts/*.parquet", sql="SELECT * FROM input")
    assert src.table.to_pylist() == [{"t": "c", "row_id": 0}]
    assert msg(path=f"file://{tmp_path}/nope.parquet") == f"input.path: file not found: '{tmp_path}/nope.parquet' " \
                                                          f"(from {tmp_path})"


@pytest.mark.parametrize("statement, kind", [
    ("COPY (SELECT 'pwned') TO '{victim}' (HEADER false)", "COPY"),
    ("COPY input TO '{victim}'", "COPY"),
    ("EXPORT DATABASE '{tmp}/export'", "EXPORT"),
    ("ATTACH '{tmp}/new.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("", "no statement"),
])
def test_file_url_input_does_not_switch_off_the_confinement(tmp_path, statement, kind):
    """The tester's case: input.path=file://... used to skip the confinement, and a COPY in input.sql
    overwrote a file. Every statement that is not a SELECT is refused, for every kind of input path."""
    parquet("r.parquet", t=["a"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sql = statement.format(victim=victim, tmp=tmp_path) or "  ;  "
    for path in (f"file://{tmp_path}/r.parquet", "r.parquet"):
        err = input_error(path=path, sql=sql)
        assert err.message == f"input.sql: must be one SELECT query; batchrun's SQL only reads (got {kind})"
    assert victim.read_text() == "precious"
    assert not os.path.exists(tmp_path / "export") and not os.path.exists(tmp_path / "new.duckdb")


def test_file_url_input_sql_cannot_read_other_local_files(tmp_path):
    parquet("r.parquet", t=["a"])
    parquet("secret.parquet", t=["s"])
    for sql in (f"SELECT * FROM read_parquet('file://{tmp_path}/secret.parquet')",
                f"SELECT * FROM read_parquet('{tmp_path}/secret.parquet')"):
        err = input_error(path=f"file://{tmp_path}/r.parquet", sql=sql)
        assert err.message.startswith("input.sql: Permission Error")
    assert read(path=f"file://{tmp_path}/r.parquet",
                sql=f"SELECT * FROM read_parquet('file://{tmp_path}/r.parquet')").num_rows == 1


def _confined(tmp_path, remote: list[str]):
    """A connection confined as read_source confines it (without the SELECT-only check in front)."""
    import duckdb

    from batchrun.io import source

    parquet("r.parquet", t=["a"])
    os.mkdir("spill")
    con = duckdb.connect(":memory:", config={"temp_directory": f"{tmp_path}/spill"})
    con.execute(f"CREATE VIEW input AS SELECT * FROM read_parquet('{tmp_path}/r.parquet')")
    source._confine(con, [f"{tmp_path}/r.parquet", *remote])
    return con


@pytest.mark.parametrize("statement", [
    "COPY (SELECT 1) TO '{tmp}/leak.csv'", "SET enable_external_access = true", "SET lock_configuration = false",
    "SET allowed_directories = ['/']", "ATTACH '{tmp}/x.duckdb'", "INSTALL httpfs", "LOAD httpfs",
    "SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM read_parquet('s3://other-bucket/x.parquet')",
    "COPY (SELECT 1) TO 's3://other-bucket/x.csv'", "SELECT * FROM read_csv('https://example.org/x.csv')",
    "COPY (SELECT 1) TO '{tmp}/spill/../leak.csv'",
])
def test_confined_connection_refuses_on_its_own(tmp_path, statement):
    """Second line of defence: even a statement past the SELECT-only check could not write a file, reach
    another file or URL, load an extension or unlock the configuration."""
    import duckdb

    con = _confined(tmp_path, ["s3://bucket/data/*.parquet", "https://example.com/x.parquet"])
    assert con.execute("SELECT current_setting('temp_directory')").fetchone() == (f"{tmp_path}/spill",)
    with pytest.raises(duckdb.Error):
        con.execute(statement.format(tmp=tmp_path)).fetchall()
    assert not os.path.exists(tmp_path / "leak.csv") and not os.path.exists(tmp_path / "x.duckdb")
    assert con.execute("SELECT * FROM input").fetchall() == [("a",)]


def test_remote_urls_are_allowed_exactly_or_by_their_glob_prefix(tmp_path):
    con = _confined(tmp_path, ["s3://bucket/data/2026-*/part.parquet", "https://example.com/x.parquet"])
    settings = dict(con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN "
                                "('allowed_paths', 'allowed_directories', 'enable_external_access', "
                                "'lock_configuration', 'autoinstall_known_extensions')").fetchall())
    assert settings == {"allowed_paths": f"['https://example.com/x.parquet', {tmp_path}/r.parquet]",
                        "allowed_directories": f"[{tmp_path}/spill/, 's3://bucket/data/']",
                        "enable_external_access": "false",
                        "lock_configuration": "true", "autoinstall_known_extensions": "false"}


def test_spill_directory_is_private_and_removed(tmp_path, monkeypatch):
    """DuckDB keeps its temp_directory writable under the confinement: read_source gives it a private one."""
    import tempfile

    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    parquet("r.parquet", t=["a"])
    assert read(path="r.parquet", sql="SELECT current_setting('temp_directory') AS d").table.to_pylist() == [
        {"d": made[0], "row_id": 0}]
    assert made[0] != os.path.join(str(tmp_path), ".tmp") and not os.path.exists(made[0])


def test_remote_scheme_urls_are_passed_to_duckdb_lower_cased(tmp_path):
    """(Object-store URLs, s3:// and gs://, are listed through pyarrow instead: tests/test_object_store.py.)"""
    from batchrun.io.source import resolve_files

    spec = InputSpec(path=["HTTPS://host/a.parquet", "hf://datasets/x/*.parquet"])
    assert resolve_files(spec) == ["https://host/a.parquet", "hf://datasets/x/*.parquet"]
