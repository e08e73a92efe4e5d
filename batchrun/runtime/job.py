"""One job, end to end: prepare → execute → finalize, with progress, resume bookkeeping and a manifest.

``prepare`` (``runtime/prepare.py``) reads, tokenizes and plans; ``execute`` runs the engine and streams
every row (engine results and row errors) to the sink; ``finalize`` writes the manifest and the success
marker, or an incomplete manifest (stopped, too many errors). Rows already committed in the output directory
(same job fingerprint) are skipped, so re-running never duplicates rows; a finished job is not run again
unless ``fresh`` (and is only read: it needs no write access). Every check comes before the first write and
before the weights load, and the weights load only when some row still needs the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from batchrun import __version__
from batchrun.errors import RuntimeFailure, TemporaryFailure
from batchrun.io import sink as sinks
from batchrun.io.outdir import OutputState
from batchrun.io.prompts import check_templates
from batchrun.io.source import file_stat, resolve_files
from batchrun.runtime.assemble import RowResult
from batchrun.runtime.prepare import PreparedJob, prepare
from batchrun.runtime.progress import Progress
from batchrun.runtime.shard_worker import choice_scorer
from batchrun.runtime.stop import StopFlag, StopRequested, handle_signals
from batchrun.spec import JobSpec

log = logging.getLogger("batchrun")


@dataclass
class JobResult:
    """What ``submit`` returns (and the CLI prints as its JSON summary)."""

    status: str  # "ok" (ran), "already_complete" (nothing to do)
    job: str
    output: str
    rows_total: int = 0  # output rows (input rows x sampling.n)
    rows_ok: int = 0
    rows_error: int = 0
    rows_skipped: int = 0  # output rows already committed by an earlier run
    prompt_tokens: int = 0
    output_tokens: int = 0
    kv_budget_tokens: int | None = None  # batchrun's engine: its KV pool (None: the reference engine)
    kv_peak_tokens: int | None = None  # the most KV held at once in this run (whole blocks)
    timings: dict[str, float] = field(default_factory=dict)
    constraint: dict[str, Any] | None = None  # sampling.constraint: kind, rows, grammars, compile and mask time
    batchprompt: dict[str, Any] | None = None  # mode: batchprompt: prompts and tokens, and single-item's cost
    workers: dict[str, Any] | None = None  # several workers: the shards, their balance, what each worker did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Execution:
    """What this run's engine did: counts over the rows it emitted, and why it ended early (if it did)."""

    rows_ok: int = 0
    rows_error: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    stopped_by: str | None = None  # the signal that asked the job to stop
    kv_budget_tokens: int | None = None
    kv_peak_tokens: int | None = None
    generate_s: float = 0.0
    workers: dict[str, Any] | None = None  # with several workers: the shards and what each worker did
    workers_load_s: float = 0.0  # with several workers: the slowest worker's load time


def fingerprint(spec: JobSpec, files: list[str]) -> str:
    """What decides the result rows and the parts' schema: the spec's model/input/prompt/sampling, the output
    columns and the result columns, the input files' stats and the model's files (a local model directory or
    GGUF file: names, sizes, modification times)."""
    stats = [asdict(file_stat(f)) for f in files]
    output = {"columns": spec.output.columns, "results": [f"{f.name}:{f.type}" for f in sinks.RESULT_FIELDS]}
    blob = json.dumps({"spec": spec.results_hash(), "output": output, "files": stats,
                       "model": _model_stats(spec.model.path or "")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_stats(path: str) -> list:
    """Stats of a local model's files; a built-in name or hub id is identified by the spec alone."""
    if os.path.isdir(path):
        return [asdict(file_stat(os.path.join(path, f))) | {"path": f} for f in sorted(os.listdir(path))
                if not f.startswith(".")]
    return [asdict(file_stat(path)) | {"path": os.path.basename(path)}] if os.path.isfile(path) else []


def run_job(spec: JobSpec, *, fresh: bool = False, progress: Progress | None = None) -> JobResult:
    """Run one job. Every check that can fail (the output directory, the input, the prompts, the KV budget)
    runs before anything is written and before the weights load; the weights load only if a row needs them.
    A signal (SIGTERM, Ctrl-C) at any time is a graceful stop (exit 75, committed rows kept)."""
    t_start = time.monotonic()
    check_templates(spec.prompt)
    sink = sinks.Sink(spec.output.path, spec.output.part_rows)
    stop = StopFlag()
    pools: list[Any] = []  # several workers: their pool, started before the job is prepared
    try:
        with handle_signals(stop):
            return _run(spec, fresh, progress or Progress(), sink, stop, t_start, pools)
    finally:
        for pool in pools:
            pool.close()
        sink.close()


def _run(spec: JobSpec, fresh: bool, progress: Progress, sink: sinks.Sink, stop: StopFlag,
         t_start: float, pools: list[Any]) -> JobResult:
    # 1. Checks and preparation. Nothing is written yet: a signal stops at once, leaving the directory as it was.
    try:
        with stop.at_once():
            state = sink.open(fresh)  # lock; files batchrun did not write, links, damage: 78
            files = resolve_files(spec.input)
            job_info = {"job": spec.name, "results_hash": fingerprint(spec, files), "spec_hash": spec.spec_hash(),
                        "id_column": spec.input.id or "row_id", "created_at": sinks.utc_now(),
                        "spec": spec.to_dict()}
            done = sink.check_job(job_info, fresh)  # another job's results: 78
            if state.complete and not fresh:
                log.info("%s is already complete (%d rows); rerun with --fresh to rebuild it", sink.path, state.rows)
                return JobResult("already_complete", spec.name, str(sink.path), rows_total=state.rows,
                                 rows_skipped=state.rows)

            from batchrun.runtime.distribute import make_pool, several_workers

            if several_workers(spec.engine):  # the workers start and load while this process prepares the job
                pools.append(make_pool(spec, done))
                pools[0].start()

            from batchrun.engine import loader  # torch is imported from here on

            t = time.monotonic()
            resolved = loader.resolve(spec.model)
            tokenizer = loader.load_tokenizer(spec.model, resolved)
            facts = loader.model_facts(spec.model, spec.engine, resolved, tokenizer=tokenizer,
                                       count_weights=bool(spec.engine.kv_budget_tokens))
            load_s = time.monotonic() - t
            prepared = prepare(spec, tokenizer, facts.max_context, done)
            spec = prepared.spec or spec  # (an OpenAI batch file's job: its lines' settings)
            if prepared.requests and spec.engine.backend == "batchrun" and spec.engine.kv_budget_tokens:
                from batchrun.engine.factory import kv_budget

                kv_budget(spec.engine, facts, prepared.requests)  # a budget the device cannot hold: 78 now
    except StopRequested:
        raise TemporaryFailure(f"stopped by {stop.signal} before any row was computed; {sink.path} is as it was "
                               "(rows committed earlier are kept); rerun the same command") from None

    source = prepared.source
    sink.set_schema(sinks.output_schema(source.table.schema, source.id_column, prepared.columns,
                                        prepared.assembler.fields),
                    {"job": spec.name, "spec_hash": spec.spec_hash(), "results_hash": job_info["results_hash"],
                     "model": spec.model.label, "batchrun_version": __version__},
                    source.table.select([source.id_column, *prepared.columns]))
    # 2. The first write (a signal only sets the flag from here on), then the weights, if any row needs them:
    # a job whose rows are all committed (a crash after the last part) is finalized without loading them.
    sink.begin(job_info, fresh)
    timings = {**prepared.timings, "load_s": load_s}
    loaded = None
    distributed = bool(prepared.requests) and bool(pools)  # (the workers load the weights)
    if prepared.requests and not stop.requested and not distributed:
        t = time.monotonic()
        try:
            with stop.at_once():
                loaded = loader.load(spec.model, spec.engine, tokenizer)
        except StopRequested:
            pass  # stopped while loading: an incomplete manifest, exit 75
        timings["load_s"] += time.monotonic() - t
        if loaded is not None:
            log.info("loaded %s on %s (%s)", spec.model.label, loaded.device, loaded.dtype)
    model = _model_record(spec, resolved, loaded, state, job_info["results_hash"])
    if stop.requested:
        run = Execution(stopped_by=stop.signal)
    elif distributed:
        run = execute_on_workers(spec, prepared, sink, progress, _committed(prepared, done), stop, pools[0])
        timings["load_s"] += run.workers_load_s
        model.update(device=run.workers["devices"], dtype=run.workers["dtype"] or model["dtype"])
    else:
        run = execute(spec, prepared, loaded, sink, progress, already_done=_committed(prepared, done), stop=stop)
    timings["generate_s"] = run.generate_s
    timings["total_s"] = time.monotonic() - t_start
    return finalize(spec, job_info, prepared, model, sink, run, _committed(prepared, done), timings)


def _committed(prepared: PreparedJob, done: set[Any]) -> int:
    """Output rows an earlier run committed (``done``: their input rows' ids)."""
    return prepared.outputs([i for i, row_id in enumerate(prepared.ids) if row_id in done]) if done else 0


def _model_record(spec: JobSpec, resolved: str, loaded: Any, state: OutputState,
                  results_hash: str) -> dict[str, Any]:
    """The manifest's ``model``: what was loaded; without weights loaded (no row needed them), the device and
    dtype an earlier run of this job recorded, else null."""
    from batchrun.engine.loader import weights_id

    if loaded is not None:
        return {"path": spec.model.path, "resolved": loaded.resolved, "device": loaded.device, "dtype": loaded.dtype}
    earlier = state.manifest if state.manifest and state.manifest.get("results_hash") == results_hash else {}
    m = earlier.get("model") if isinstance(earlier.get("model"), dict) else {}
    return {"path": spec.model.path, "resolved": weights_id(spec.model, resolved), "device": m.get("device"),
            "dtype": m.get("dtype")}


def execute(spec: JobSpec, prepared: PreparedJob, loaded: Any, sink: sinks.Sink, progress: Progress,
            already_done: int, stop: StopFlag) -> Execution:
    """Emit the row errors, then run the engine over the requests (``loaded``: None when there are none),
    streaming each finished row to ``sink``.

    A signal (SIGTERM, Ctrl-C; ``stop``: the flag of the handlers ``run_job`` installed) ends the engine's
    run at its next poll (``stopped_by`` says which); a crash keeps every finished row (flushed) and
    propagates."""
    from batchrun.engine.factory import kv_usage, make_engine

    assembler = prepared.assembler
    run = Execution()
    emit = row_emitter(run, sink)

    if prepared.batchprompt is not None:  # several rows per prompt, in rounds: its own loop
        from batchrun.runtime.batchprompt_job import execute_batchprompt

        try:
            return execute_batchprompt(spec, prepared, loaded, emit, progress, already_done, stop, run)
        except BaseException:
            sink.flush()  # (the row errors emitted before the rounds)
            raise
    for row, message in prepared.errors:
        emit(assembler.failed(row, message))

    engine = make_engine(spec, loaded, prepared.requests) if prepared.requests else None
    score = choice_scorer(spec, loaded, prepared)
    # (counts here are output rows: sampling.n per input row, or each OpenAI batch line's own n)
    progress.start(prepared.outputs(), already_done=already_done + prepared.outputs([r for r, _ in prepared.errors]))
    t = time.monotonic()
    try:
        runs = engine.run(prepared.requests, prepared.plan, interrupt=lambda: stop.requested) if engine else ()
        for batch in runs:
            for c in batch:
                emit(assembler.add(score(c) if score else c))
            progress.advance(len(batch), sum(len(c.token_ids) for c in batch))
            if stop.requested:
                break
    except BaseException:
        # Keep every finished row: a crash or Ctrl-C then costs only the rows in flight.
        try:
            sink.flush()
        except Exception:
            log.exception("could not save the finished rows")
        raise
    finally:
        progress.finish()  # also on a crash or Ctrl-C: leave the terminal clean
    run.generate_s = time.monotonic() - t
    run.stopped_by = stop.signal
    if engine is not None:
        run.kv_budget_tokens, run.kv_peak_tokens = kv_usage(engine)
    return run


def row_emitter(run: Execution, sink: sinks.Sink) -> Callable[[list[RowResult], int | None], None]:
    """A function that counts finished output rows into ``run`` and hands them to ``sink`` (with several
    workers, each row's shard: parts are per shard)."""

    def emit(results: list[RowResult], shard: int | None = None) -> None:
        for r in results:
            v = r.values
            if v["error"]:
                run.rows_error += 1
            else:
                run.rows_ok += 1
            run.prompt_tokens += v["prompt_tokens"] or 0
            run.output_tokens += v["output_tokens"] or 0
            sink.add(r.row, v, shard=shard)  # (the input's columns stay Arrow data: no type is converted)

    return emit


def execute_on_workers(spec: JobSpec, prepared: PreparedJob, sink: sinks.Sink, progress: Progress,
                       already_done: int, stop: StopFlag, pool: Any) -> Execution:
    """``execute`` over several workers (``engine.devices``, ``engine.executor``; ``pool``: started): the row
    errors here, the requests shard by shard on the workers (``runtime/distribute.py``), every row written by
    this process."""
    from batchrun.runtime.distribute import run_shards

    run = Execution()
    emit = row_emitter(run, sink)
    for row, message in prepared.errors:
        emit(prepared.assembler.failed(row, message))
    progress.start(prepared.outputs(), already_done=already_done + prepared.outputs([r for r, _ in prepared.errors]))
    t = time.monotonic()
    try:
        out = run_shards(spec, prepared, pool, emit, progress, stop)
    except BaseException:
        try:
            sink.flush()  # keep every row received
        except Exception:
            log.exception("could not save the finished rows")
        raise
    finally:
        progress.finish()
    run.generate_s = time.monotonic() - t
    run.stopped_by = stop.signal
    run.kv_budget_tokens, run.kv_peak_tokens = out.kv_budget_tokens, out.kv_peak_tokens
    run.workers, run.workers_load_s = out.report, out.load_s
    return run


def finalize(spec: JobSpec, job_info: dict[str, Any], prepared: PreparedJob, model: dict[str, Any],
             sink: sinks.Sink, run: Execution, rows_skipped: int, timings: dict[str, float]) -> JobResult:
    """Write the manifest (``model``: its model record): with the success marker when the job is whole, else
    marked incomplete (stopped: exit 75, resumable; too many row errors: exit 1)."""
    status = "interrupted" if run.stopped_by else "ok"
    total = prepared.outputs()  # output rows
    result = JobResult(status, spec.name, str(sink.path), rows_total=total, rows_ok=run.rows_ok,
                       rows_error=run.rows_error, rows_skipped=rows_skipped, prompt_tokens=run.prompt_tokens,
                       output_tokens=run.output_tokens, kv_budget_tokens=run.kv_budget_tokens,
                       kv_peak_tokens=run.kv_peak_tokens, timings={k: round(v, 3) for k, v in timings.items()},
                       constraint=prepared.constraint.report() if prepared.constraint else None,
                       batchprompt=prepared.batchprompt.report or None if prepared.batchprompt else None,
                       workers=run.workers)
    sink.flush()  # totals() reads the parts
    totals = sink.totals()

    def manifest(**extra: Any) -> dict[str, Any]:
        if result.constraint is not None:
            extra["constraint"] = result.constraint
        if result.batchprompt is not None:
            extra["batchprompt"] = result.batchprompt
        if result.workers is not None:
            extra["workers"] = result.workers
        return sinks.build_manifest(
            job_info, totals, this_run=run.rows_ok + run.rows_error, from_earlier_runs=rows_skipped,
            model=model,
            engine=spec.engine.backend, source=prepared.source, timings=result.timings,
            kv={"budget_tokens": run.kv_budget_tokens, "peak_tokens": run.kv_peak_tokens}, **extra)

    if run.stopped_by:
        sink.write_manifest(manifest(complete=False, stopped_by=run.stopped_by))
        raise TemporaryFailure(f"stopped by {run.stopped_by}: {sink.rows_written + rows_skipped} of "
                               f"{total} rows are saved in {sink.path}; rerun the same command to "
                               "finish the job")
    limit = spec.output.max_error_rate
    if limit is not None and totals["rows"] and totals["error"] / totals["rows"] > limit:
        sink.write_manifest(manifest(complete=False))
        raise RuntimeFailure(f"{totals['error']} of {totals['rows']} rows failed "
                             f"({100 * totals['error'] / totals['rows']:.1f}%), more than output.max_error_rate "
                             f"= {limit}; the rows and their errors are in {sink.path}")
    sink.commit(manifest())
    return result
