"""Output on an object store (``s3://bucket/prefix``), against moto's S3 server on the loopback interface:
parts, manifest and ``_SUCCESS`` written in that order as whole objects; resume after a crash skips committed
ids; a lease instead of an OS lock (a second writer refused while it is live, an expired or dead holder's
lease taken over, a lost lease writes nothing more); parts named per shard (also on a local directory);
``status`` on the URL; and a whole job submitted to S3 equals the same job written locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the local S3 server")

from batchrun import api
from batchrun.errors import SpecError, TemporaryFailure
from batchrun.io import lease as leases
from batchrun.io.outdir import JOB_FILE, LEASE, MANIFEST, SUCCESS, read_state
from batchrun.io.sink import Sink, output_schema
from batchrun.io.store import ObjectStore
from helpers import SMALL_JOB, write_job

INPUT = pa.table({"id": list(range(10)), "text": [f"text {i}" for i in range(10)]})
JOB = {"job": "t", "results_hash": "r1", "spec_hash": "s1", "id_column": "id", "spec": {}}


def values(i: int) -> dict:
    return {"output": f"out {i}", "prompt_tokens": 3, "output_tokens": 2, "finish_reason": "stop", "error": None}


def started(path, part_rows: int = 3, fresh: bool = False) -> tuple[Sink, set]:
    """A sink past open → check_job → set_schema → begin, and the ids already committed."""
    sink = Sink(path, part_rows)
    sink.open(fresh)
    done = sink.check_job(JOB, fresh)
    sink.set_schema(output_schema(INPUT.schema, "id", ["text"]), {"results_hash": JOB["results_hash"]},
                    INPUT.select(["id", "text"]))
    sink.begin(JOB, fresh)
    return sink, done


def manifest() -> dict:
    return {"job": "t", "complete": True, "results_hash": JOB["results_hash"]}


def objects(path: str) -> list[str]:
    store = ObjectStore(path)
    return [name for name, _ in store.entries()]


def rows(path: str) -> list[tuple]:
    st = read_state(path)
    store = ObjectStore(path) if path.startswith("s3://") else None
    tables = [store.read_table(n) if store else pq.read_table(os.path.join(path, n)) for n in st.parts]
    return sorted((r["id"], r["text"], r["output"]) for t in tables for r in t.to_pylist())


# ---------------------------------------------------------------------------------------------- the sink


def test_parts_then_manifest_then_success_each_one_whole_object(url, monkeypatch):
    written: list[str] = []
    for method in ("write", "write_parquet"):
        real = getattr(ObjectStore, method)

        def record(self, name, data, _real=real):
            if name != LEASE:
                written.append(name)
            return _real(self, name, data)

        monkeypatch.setattr(ObjectStore, method, record)
    sink, done = started(url)
    assert done == set()
    for i in range(7):
        sink.add(i, values(i))
    sink.commit(manifest())
    sink.close()
    parts = ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert written == [JOB_FILE, *parts, MANIFEST, SUCCESS]
    assert objects(url) == sorted([JOB_FILE, *parts, MANIFEST, SUCCESS])  # the lease is gone once closed
    st = read_state(url)
    assert st.complete and st.rows == 7 and not st.problems
    m = json.loads(ObjectStore(url).read(MANIFEST))
    assert [p["name"] for p in m["parts"]] == parts and [p["rows"] for p in m["parts"]] == [3, 3, 1]
    assert rows(url) == [(i, f"text {i}", f"out {i}") for i in range(7)]


def test_resume_after_a_crash_skips_the_committed_ids(url):
    sink, _ = started(url)
    for i in range(6):
        sink.add(i, values(i))  # two parts written, then the process "dies": no manifest, no success marker
    sink._lease.release()  # (a crash leaves an expired lease; releasing stands in for waiting it out)
    assert read_state(url).complete is False and read_state(url).rows == 6

    sink, done = started(url)
    assert done == set(range(6))
    for i in range(10):
        if i not in done:
            sink.add(i, values(i))
    sink.commit(manifest())
    sink.close()
    assert rows(url) == [(i, f"text {i}", f"out {i}") for i in range(10)]
    assert read_state(url).complete


def test_a_failed_upload_leaves_no_part_and_keeps_the_rows_buffered(url, monkeypatch):
    sink, _ = started(url)
    real = ObjectStore.write_parquet

    def unreachable(self, name, table):
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation")

    monkeypatch.setattr(ObjectStore, "write_parquet", unreachable)
    sink.add(0, values(0))
    sink.add(1, values(1))
    with pytest.raises(TemporaryFailure, match=r"cannot write results to .* NETWORK_CONNECTION.*rerun to resume"):
        sink.add(2, values(2))
    assert not [n for n in objects(url) if n.startswith("part-")] and len(sink._buffers[None]) == 3
    monkeypatch.setattr(ObjectStore, "write_parquet", real)
    sink.commit(manifest())  # the store is back: the buffered rows are written
    sink.close()
    assert rows(url) == [(i, f"text {i}", f"out {i}") for i in range(3)]


def test_an_unreachable_store_is_a_temporary_failure(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # (nothing listens on the discard port)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(TemporaryFailure) as e:
        Sink("s3://bucket/job", 3).open(False)
    assert e.value.exit_code == 75 and "s3://bucket/job" in str(e.value)


def test_files_batchrun_did_not_write_are_refused_and_nothing_is_written(url):
    ObjectStore(url).write("notes.txt", b"mine")
    with pytest.raises(SpecError, match="holds files batchrun did not write"):
        Sink(url, 3).open(False)
    assert objects(url) == ["notes.txt"]  # not even a lease


def test_parts_of_shards_never_mix_and_are_named_per_shard(tmp_path, url):
    for path in (str(tmp_path / "out"), url):
        sink, _ = started(path, part_rows=2)
        sink.add(0, values(0), shard=1)
        sink.add(1, values(1), shard=0)
        sink.add(2, values(2), shard=1)  # shard 1 has part_rows: its part is written; shard 0's row waits
        sink.add(3, values(3))  # shard None: today's names
        sink.add(4, values(4), shard=12345)
        sink.commit(manifest())
        sink.close()
        st = read_state(path)
        assert st.complete and st.parts == ["part-000000-s0001.parquet", "part-000001-s0000.parquet",
                                            "part-000002.parquet", "part-000003-s12345.parquet"]
        assert {n: i["rows"] for n, i in st.part_info.items()} == {
            "part-000000-s0001.parquet": 2, "part-000001-s0000.parquet": 1, "part-000002.parquet": 1,
            "part-000003-s12345.parquet": 1}
        assert rows(path) == [(i, f"text {i}", f"out {i}") for i in range(5)]


def test_a_resumed_sharded_job_numbers_its_parts_after_the_last(tmp_path):
    path = str(tmp_path / "out")
    sink, _ = started(path, part_rows=1)
    sink.add(0, values(0), shard=3)
    sink.add(1, values(1), shard=0)
    sink.close()  # no manifest: an unfinished job
    sink, done = started(path, part_rows=1)
    assert done == {0, 1}
    sink.add(2, values(2), shard=3)
    sink.commit(manifest())
    sink.close()
    assert read_state(path).parts == ["part-000000-s0003.parquet", "part-000001-s0000.parquet",
                                      "part-000002-s0003.parquet"]


def test_shard_buffers_flush_by_time_each_on_its_own(tmp_path):
    sink, _ = started(str(tmp_path / "out"), part_rows=100)
    sink.add(0, values(0), flush_after_s=60, shard=0)
    sink._flushed[0] -= 61  # shard 0's buffer is now over its time
    sink.add(1, values(1), flush_after_s=60, shard=1)  # shard 1's own clock: not due
    assert sink._parts == {}
    sink.add(2, values(2), flush_after_s=60, shard=0)
    assert list(sink._parts) == ["part-000000-s0000.parquet"] and sink._buffers[1] == [(1, values(1))]
    sink.flush()
    assert sorted(sink._parts) == ["part-000000-s0000.parquet", "part-000001-s0001.parquet"]
    sink.close()


# ---------------------------------------------------------------------------------------------- the lease


def test_a_second_writer_is_refused_while_the_lease_is_live(url):
    first, _ = started(url)
    second = Sink(url, 3)
    with pytest.raises(TemporaryFailure) as e:
        second.open(False)
    assert e.value.exit_code == 75
    assert f"output {url} is locked by another batchrun process (lease held by " in str(e.value)
    assert f" pid {os.getpid()} until " in str(e.value) and "retry when it has finished" in str(e.value)
    first.add(0, values(0))
    first.commit(manifest())
    first.close()
    assert LEASE not in objects(url)
    third = Sink(url, 3)
    assert third.open(False).complete  # free again (a finished job is only read: no lease taken)
    third.close()


def _lease(url: str, **owner) -> None:
    expires = owner.pop("expires")
    rec = {"owner": {"host": "elsewhere", "pid": 4242, "token": "theirs", "machine": None, **owner},
           "expires": expires, "expires_at": leases._iso(expires)}
    ObjectStore(url).write(LEASE, json.dumps(rec).encode())


def test_an_expired_lease_is_taken_over(url):
    _lease(url, expires=time.time() + 60)
    with pytest.raises(TemporaryFailure, match="lease held by elsewhere pid 4242 until "):
        Sink(url, 3).open(False)
    _lease(url, expires=time.time() - 1)
    sink, _ = started(url)
    assert json.loads(ObjectStore(url).read(LEASE))["owner"]["token"] == sink._lease.owner["token"]
    sink.close()


def test_a_live_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(url):
    machine = leases._machine()
    if machine is None:
        pytest.skip("no /proc: a process's liveness cannot be told apart from pid reuse in other namespaces")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    _lease(url, expires=time.time() + 600, host=socket.gethostname(), pid=gone.pid, machine=machine)
    sink, _ = started(url)
    sink.close()


def test_a_lost_lease_writes_no_manifest_and_no_success(url):
    sink, _ = started(url)
    sink.add(0, values(0))
    _lease(url, expires=time.time() + 600)  # another writer took it over (ours had expired, say)
    with pytest.raises(TemporaryFailure, match=r"no longer holds its lease \(taken over: lease held by elsewhere"):
        sink.commit(manifest())
    sink.close()
    assert MANIFEST not in objects(url) and SUCCESS not in objects(url)
    assert json.loads(ObjectStore(url).read(LEASE))["owner"]["token"] == "theirs"  # theirs is left alone


def test_the_lease_is_renewed_while_the_job_runs(url, monkeypatch):
    monkeypatch.setenv("BATCHRUN_LEASE_S", "1")
    sink, _ = started(url)
    first = json.loads(ObjectStore(url).read(LEASE))["expires"]
    time.sleep(0.8)  # renewed every quarter of the lease time
    assert json.loads(ObjectStore(url).read(LEASE))["expires"] > first
    sink.add(0, values(0))
    sink.commit(manifest())
    sink.close()


# ---------------------------------------------------------------------------------------------- status, jobs


def test_status_reads_the_url(url, s3):
    assert api.status(url)["state"] == "missing"
    assert api.status("s3://no-such-bucket-here/x")["state"] == "missing"
    sink, _ = started(url)
    for i in range(4):
        sink.add(i, values(i))
    assert api.status(url)["state"] == "incomplete"
    sink.commit(manifest())
    sink.close()
    st = api.status(url)
    assert st["state"] == "complete" and st["rows_committed"] == 4 and st["parts"] == 2
    ObjectStore(url).write("stray.csv", b"x")
    st = api.status(url)
    assert st["state"] == "damaged" and st["problems"] == ["stray.csv: not written by batchrun"]
    assert api.status(s3)["state"] == "missing"  # a bucket without a prefix is not read




def test_a_job_submitted_to_s3_equals_the_same_job_written_locally(tmp_path, url, tiny_model_dir):
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": list(range(5)), "text": ["Great kettle.", "Broke.", "A cable.", "Nice.",
                                                             "Never again."]}), data)
    job = write_job(tmp_path, SMALL_JOB.format(model=tiny_model_dir, data=data, out=tmp_path / "local"))
    api.submit(job)
    result = api.submit(job, [f"output.path={url}"])
    assert result.status == "ok" and result.output == url and result.rows_total == 5
    cols = ["id", "text", "output", "output_tokens"]
    local = duckdb.sql(f"SELECT {', '.join(cols)} FROM '{tmp_path}/local/*.parquet' ORDER BY id").fetchall()
    store = ObjectStore(url)
    remote = pa.concat_tables([store.read_table(n, cols) for n in read_state(url).parts]).sort_by("id")
    assert list(zip(*(remote.column(c).to_pylist() for c in cols))) == local
    assert sorted(objects(url)) == sorted([JOB_FILE, MANIFEST, SUCCESS, "part-000000.parquet",
                                           "part-000001.parquet", "part-000002.parquet"])
    again = api.submit(job, [f"output.path={url}"])
    assert again.status == "already_complete" and again.rows_total == 5
