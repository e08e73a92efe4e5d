"""One job, end to end: prepare → execute → finalize, with progress, resume bookkeeping and a manifest.

``prepare`` (``runtime/prepare.py``) reads, tokenizes and plans; ``execute`` runs the engine and streams
every row (engine results and row errors) to the sink; ``finalize`` writes the manifest and the success
marker, or an incomplete manifest (stopped, too many errors). Rows already committed in the output directory
(same job fingerprint) are skipped, so re-running never duplicates rows; a finished job is not run again
unless ``fresh``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from batchrun import __version__
from batchrun.errors import RuntimeFailure, TemporaryFailure
from batchrun.io import sink as sinks
from batchrun.io.prompts import check_templates
from batchrun.io.source import file_stat, resolve_files
from batchrun.runtime.assemble import RowResult
from batchrun.runtime.prepare import PreparedJob, prepare
from batchrun.runtime.progress import Progress
from batchrun.runtime.stop import StopFlag, handle_signals
from batchrun.spec import JobSpec

log = logging.getLogger("batchrun")


@dataclass
class JobResult:
    """What ``submit`` returns (and the CLI prints as its JSON summary)."""

    status: str  # "ok" (ran), "already_complete" (nothing to do)
    job: str
    output: str
    rows_total: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    rows_skipped: int = 0  # already committed by an earlier run
    prompt_tokens: int = 0
    output_tokens: int = 0
    kv_budget_tokens: int | None = None  # batchrun's engine: its KV pool (None: the reference engine)
    kv_peak_tokens: int | None = None  # the most KV held at once in this run (whole blocks)
    timings: dict[str, float] = field(default_factory=dict)

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


def fingerprint(spec: JobSpec, files: list[str]) -> str:
    """What decides the result rows: the spec's model/input/prompt/sampling, the input files' stats and the
    model's files (a local model directory or GGUF file: names, sizes, modification times)."""
    stats = [asdict(file_stat(f)) for f in files]
    blob = json.dumps({"spec": spec.results_hash(), "files": stats, "model": _model_stats(spec.model.path)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_stats(path: str) -> list:
    """Stats of a local model's files; a built-in name or hub id is identified by the spec alone."""
    if os.path.isdir(path):
        return [asdict(file_stat(os.path.join(path, f))) | {"path": f} for f in sorted(os.listdir(path))
                if not f.startswith(".")]
    return [asdict(file_stat(path)) | {"path": os.path.basename(path)}] if os.path.isfile(path) else []


def run_job(spec: JobSpec, *, fresh: bool = False, progress: Progress | None = None) -> JobResult:
    t_start = time.monotonic()
    check_templates(spec.prompt)
    sink = sinks.Sink(spec.output.path, spec.output.part_rows)
    sink.lock()
    try:
        files = resolve_files(spec.input)
        job_info = {"job": spec.name, "results_hash": fingerprint(spec, files), "spec_hash": spec.spec_hash(),
                    "id_column": spec.input.id or "row_id", "created_at": sinks.utc_now(), "spec": spec.to_dict()}
        state, done = sink.prepare(job_info, fresh)
        if state.complete and not fresh:
            log.info("%s is already complete (%d rows); rerun with --fresh to rebuild it", sink.path, state.rows)
            return JobResult("already_complete", spec.name, str(sink.path), rows_total=state.rows,
                             rows_skipped=state.rows)

        from batchrun.engine import loader  # torch is imported from here on

        t = time.monotonic()
        resolved = loader.resolve(spec.model)
        tokenizer = loader.load_tokenizer(spec.model, resolved)
        facts = loader.model_facts(spec.model, spec.engine, resolved)
        load_s = time.monotonic() - t
        prepared = prepare(spec, tokenizer, facts.max_context, done)
        t = time.monotonic()
        loaded = loader.load(spec.model, spec.engine, tokenizer)
        timings = {**prepared.timings, "load_s": load_s + time.monotonic() - t}
        log.info("loaded %s on %s (%s)", spec.model.path, loaded.device, loaded.dtype)

        source = prepared.source
        sink.set_schema(sinks.output_schema(source.table.schema, source.id_column, prepared.columns),
                        {"job": spec.name, "spec_hash": spec.spec_hash(), "results_hash": job_info["results_hash"],
                         "model": spec.model.path, "batchrun_version": __version__})
        run = execute(spec, prepared, loaded, sink, progress or Progress(), already_done=len(done))
        timings["generate_s"] = run.generate_s
        timings["total_s"] = time.monotonic() - t_start
        return finalize(spec, job_info, prepared, loaded, sink, run, len(done), timings)
    finally:
        sink.close()


def execute(spec: JobSpec, prepared: PreparedJob, loaded: Any, sink: sinks.Sink, progress: Progress,
            already_done: int = 0) -> Execution:
    """Emit the row errors, then run the engine over the requests, streaming each finished row to ``sink``.

    A signal (SIGTERM, Ctrl-C) stops it after the current step (``stopped_by`` says which); a crash keeps
    every finished row (flushed) and propagates."""
    from batchrun.engine.factory import kv_usage, make_engine

    source, ids, assembler = prepared.source, prepared.ids, prepared.assembler
    columns = source.table.select(prepared.columns).to_pylist() if prepared.columns else [{} for _ in ids]
    run = Execution()

    def emit(results: list[RowResult]) -> None:
        for r in results:
            v = r.values
            if v["error"]:
                run.rows_error += 1
            else:
                run.rows_ok += 1
            run.prompt_tokens += v["prompt_tokens"] or 0
            run.output_tokens += v["output_tokens"]
            sink.add({source.id_column: ids[r.row], **columns[r.row], **v})

    for row, message in prepared.errors:
        emit(assembler.failed(row, message))

    engine = make_engine(spec, loaded, prepared.requests)
    progress.start(source.num_rows, already_done=already_done + len(prepared.errors))
    t = time.monotonic()
    stop = StopFlag()
    try:
        with handle_signals(stop):
            for batch in engine.run(prepared.requests, prepared.plan):
                for c in batch:
                    emit(assembler.add(c))
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
    run.kv_budget_tokens, run.kv_peak_tokens = kv_usage(engine)
    if run.kv_budget_tokens is not None and not prepared.requests:
        run.kv_peak_tokens = 0  # nothing ran, nothing held
    return run


def finalize(spec: JobSpec, job_info: dict[str, Any], prepared: PreparedJob, loaded: Any, sink: sinks.Sink,
             run: Execution, rows_skipped: int, timings: dict[str, float]) -> JobResult:
    """Write the manifest: with the success marker when the job is whole, else marked incomplete (stopped:
    exit 75, resumable; too many row errors: exit 1)."""
    status = "interrupted" if run.stopped_by else "ok"
    result = JobResult(status, spec.name, str(sink.path), rows_total=prepared.num_rows, rows_ok=run.rows_ok,
                       rows_error=run.rows_error, rows_skipped=rows_skipped, prompt_tokens=run.prompt_tokens,
                       output_tokens=run.output_tokens, kv_budget_tokens=run.kv_budget_tokens,
                       kv_peak_tokens=run.kv_peak_tokens, timings={k: round(v, 3) for k, v in timings.items()})
    sink.flush()  # totals() reads the parts
    totals = sink.totals()

    def manifest(**extra: Any) -> dict[str, Any]:
        return sinks.build_manifest(
            job_info, totals, this_run=run.rows_ok + run.rows_error, from_earlier_runs=rows_skipped,
            model={"path": spec.model.path, "resolved": loaded.resolved, "device": loaded.device,
                   "dtype": loaded.dtype},
            engine=spec.engine.backend, source=prepared.source, timings=result.timings,
            kv={"budget_tokens": run.kv_budget_tokens, "peak_tokens": run.kv_peak_tokens}, **extra)

    if run.stopped_by:
        sink.write_manifest(manifest(complete=False, stopped_by=run.stopped_by))
        raise TemporaryFailure(f"stopped by {run.stopped_by}: {sink.rows_written + rows_skipped} of "
                               f"{prepared.num_rows} rows are saved in {sink.path}; rerun the same command to "
                               "finish the job")
    limit = spec.output.max_error_rate
    if limit is not None and totals["rows"] and totals["error"] / totals["rows"] > limit:
        sink.write_manifest(manifest(complete=False))
        raise RuntimeFailure(f"{totals['error']} of {totals['rows']} rows failed "
                             f"({100 * totals['error'] / totals['rows']:.1f}%), more than output.max_error_rate "
                             f"= {limit}; the rows and their errors are in {sink.path}")
    sink.commit(manifest())
    return result
