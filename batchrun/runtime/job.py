"""One job, end to end: read → prompts → engine → sink, with progress, resume bookkeeping and a manifest.

Rows already committed in the output directory (same job fingerprint) are skipped, so re-running never
duplicates rows; a finished job is not run again unless ``fresh``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from batchrun import __version__
from batchrun.errors import InputDataError, RuntimeFailure, SpecError, TemporaryFailure
from batchrun.io import sink as sinks
from batchrun.io.prompts import Prompts, build_prompts, check_templates
from batchrun.io.source import Source, read_source, require_columns, resolve_files
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
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(spec: JobSpec, files: list[str]) -> str:
    """What decides the result rows: the spec's model/input/prompt/sampling, the input files' stats and the
    model's files (a local model directory or GGUF file: names, sizes, modification times)."""
    from batchrun.io.source import _stat

    stats = [asdict(_stat(f)) for f in files]
    blob = json.dumps({"spec": spec.results_hash(), "files": stats, "model": _model_stats(spec.model.path)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_stats(path: str) -> list:
    """Stats of a local model's files; a built-in name or hub id is identified by the spec alone."""
    from batchrun.io.source import _stat

    if os.path.isdir(path):
        return [asdict(_stat(os.path.join(path, f))) | {"path": f} for f in sorted(os.listdir(path))
                if not f.startswith(".")]
    return [asdict(_stat(path)) | {"path": os.path.basename(path)}] if os.path.isfile(path) else []


def run_job(spec: JobSpec, *, fresh: bool = False, progress: Progress | None = None) -> JobResult:
    progress = progress or Progress()
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    check_templates(spec.prompt)
    sink = sinks.Sink(spec.output.path, spec.output.part_rows)
    sink.lock()
    try:
        files = resolve_files(spec.input)
        job_info = {"job": spec.name, "results_hash": fingerprint(spec, files), "spec_hash": spec.spec_hash(),
                    "id_column": spec.input.id or "row_id", "created_at": _now(), "spec": spec.to_dict()}
        state, done = sink.prepare(job_info, fresh)
        if state.complete and not fresh:
            log.info("%s is already complete (%d rows); rerun with --fresh to rebuild it", sink.path, state.rows)
            return JobResult("already_complete", spec.name, str(sink.path), rows_total=state.rows,
                             rows_skipped=state.rows)

        t = time.monotonic()
        source = read_source(spec.input)
        passthrough = _output_columns(spec, source)
        max_tokens, mt_errors = _max_tokens(spec, source)
        timings["read_s"] = time.monotonic() - t
        log.info("read %d rows from %d file(s)", source.num_rows, len(files))

        from batchrun.engine import loader  # torch is imported from here on

        t = time.monotonic()
        loaded = loader.load(spec.model, spec.engine)
        timings["load_s"] = time.monotonic() - t
        log.info("loaded %s on %s (%s)", spec.model.path, loaded.device, loaded.dtype)

        t = time.monotonic()
        prompts = build_prompts(spec.prompt, source.table, loaded.tokenizer)
        timings["tokenize_s"] = time.monotonic() - t

        ids = source.table.column(source.id_column).to_pylist()
        lengths = prompts.tokens.lengths
        rows_in = source.table.select(passthrough).to_pylist() if passthrough else [{} for _ in ids]
        schema = pa.schema([source.table.schema.field(source.id_column)]
                           + [source.table.schema.field(c) for c in passthrough] + sinks.RESULT_FIELDS)
        sink.set_schema(schema, {"job": spec.name, "spec_hash": spec.spec_hash(),
                                 "results_hash": job_info["results_hash"], "model": spec.model.path,
                                 "batchrun_version": __version__})

        requests, error_rows = _requests(spec, ids, prompts, max_tokens, mt_errors, loaded.max_context, done)
        t = time.monotonic()
        plan = _plan(spec, prompts, requests)
        timings["plan_s"] = time.monotonic() - t
        counts = {"ok": 0, "error": 0, "prompt_tokens": 0, "output_tokens": 0}

        def emit(index: int, **result: Any) -> None:
            row = {source.id_column: ids[index], **rows_in[index], **result}
            counts["error" if result["error"] else "ok"] += 1
            counts["prompt_tokens"] += result["prompt_tokens"] or 0
            counts["output_tokens"] += result["output_tokens"]
            sink.add(row)

        for index, message in error_rows:
            n = int(lengths[index]) or None
            emit(index, output=None, prompt_tokens=n, output_tokens=0, finish_reason="error", error=message)

        engine = _engine(spec, loaded, requests)
        progress.start(source.num_rows, already_done=len(done) + len(error_rows))
        t = time.monotonic()
        stop = StopFlag()
        try:
            with handle_signals(stop):
                for batch in engine.run(requests, plan):
                    for c in batch:
                        emit(c.index, output=None if c.error else c.text, prompt_tokens=int(lengths[c.index]),
                             output_tokens=len(c.token_ids), finish_reason=c.finish_reason, error=c.error)
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
        timings["generate_s"] = time.monotonic() - t
        timings["total_s"] = time.monotonic() - t_start
        if stop.requested:
            sink.flush()
            partial = JobResult("interrupted", spec.name, str(sink.path), rows_total=source.num_rows,
                                rows_ok=counts["ok"], rows_error=counts["error"], rows_skipped=len(done),
                                prompt_tokens=counts["prompt_tokens"], output_tokens=counts["output_tokens"],
                                timings={k: round(v, 3) for k, v in timings.items()})
            manifest = _manifest(spec, job_info, loaded, partial, source, sink.totals())
            sinks.write_atomic(sink.path / sinks.MANIFEST, sinks.dumps({**manifest, "complete": False,
                                                                        "stopped_by": stop.signal}))
            raise TemporaryFailure(f"stopped by {stop.signal}: {sink.rows_written + len(done)} of "
                                   f"{source.num_rows} rows are saved in {sink.path}; rerun the same command to "
                                   "finish the job")
        result = JobResult("ok", spec.name, str(sink.path), rows_total=source.num_rows,
                           rows_ok=counts["ok"], rows_error=counts["error"], rows_skipped=len(done),
                           prompt_tokens=counts["prompt_tokens"], output_tokens=counts["output_tokens"],
                           timings={k: round(v, 3) for k, v in timings.items()})
        sink.flush()  # totals() reads the parts
        totals = sink.totals()
        manifest = _manifest(spec, job_info, loaded, result, source, totals)
        limit = spec.output.max_error_rate
        if limit is not None and totals["rows"] and totals["error"] / totals["rows"] > limit:
            sinks.write_atomic(sink.path / sinks.MANIFEST, sinks.dumps({**manifest, "complete": False}))
            raise RuntimeFailure(f"{totals['error']} of {totals['rows']} rows failed "
                                 f"({100 * totals['error'] / totals['rows']:.1f}%), more than output.max_error_rate "
                                 f"= {limit}; the rows and their errors are in {sink.path}")
        sink.commit(manifest)
        return result
    finally:
        sink.close()


def _engine(spec: JobSpec, loaded: Any, requests: list) -> Any:
    from batchrun.engine.requests import SamplingParams

    s = spec.sampling
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop=tuple(s.stop),
                            ignore_eos=s.ignore_eos)
    e = spec.engine
    if e.backend == "reference":
        from batchrun.engine.reference import ReferenceEngine

        return ReferenceEngine(loaded, params, batch_size=e.batch_size)
    from batchrun.engine.batch import BatchEngine, default_kv_budget

    budget = default_kv_budget(loaded, e.kv_budget_tokens)
    # No job needs more KV than all its rows at full length at once: a smaller pool is allocated faster.
    # (2 blocks a row: one for rounding up, one for the admission rule's rounding allowance.)
    cap = sum(len(r.prompt_ids) + r.max_tokens + 2 * e.block_size for r in requests)
    budget = max(min(budget, -(-cap // e.block_size) * e.block_size), e.block_size)
    log.info("engine: batchrun, KV budget %d tokens in blocks of %d", budget, e.block_size)
    return BatchEngine(loaded, params, kv_budget_tokens=budget, block_size=e.block_size, step_tokens=e.step_tokens)


def _output_columns(spec: JobSpec, source: Source) -> list[str]:
    names = source.table.column_names
    if spec.output.columns is None:
        cols = [c for c in names if c != source.id_column]
        clash = [c for c in cols if c in sinks.RESULT_COLUMNS]
        if clash:
            raise SpecError(f"output.columns: input column(s) {clash} would clash with result columns "
                            f"{sinks.RESULT_COLUMNS}; list the columns to keep in output.columns")
        return cols
    require_columns(source.table, list(spec.output.columns), "output.columns")
    clash = [c for c in spec.output.columns if c in sinks.RESULT_COLUMNS]
    if clash:
        raise SpecError(f"output.columns: {clash} clash with result columns {sinks.RESULT_COLUMNS}")
    return list(dict.fromkeys(c for c in spec.output.columns if c != source.id_column))


def _max_tokens(spec: JobSpec, source: Source) -> tuple[list[int], dict[int, str]]:
    """Per-row max_tokens: the spec's number, or a column (a null or non-positive value is a row error)."""
    mt = spec.sampling.max_tokens
    n = source.num_rows
    if isinstance(mt, int):
        return [mt] * n, {}
    require_columns(source.table, [mt], "sampling.max_tokens")
    col = source.table.column(mt)
    if not pa.types.is_integer(col.type):
        raise InputDataError(f"sampling.max_tokens: column {mt!r} has type {col.type}; it must hold integers")
    values, errors = [], {}
    for i, v in enumerate(col.to_pylist()):
        if v is None or v < 1:
            errors[i] = f"max_tokens column {mt!r} is {'null' if v is None else v}; it must be >= 1"
        values.append(v or 0)
    return values, errors


def _requests(spec: JobSpec, ids: list[Any], prompts: Prompts, max_tokens: list[int],
              mt_errors: dict[int, str], max_context: int | None, done: set[Any]):
    """Requests for the rows still to run, and (row, message) for rows that fail before the engine."""
    from batchrun.engine.requests import Request, row_seed

    requests, errors = [], []
    lengths = prompts.tokens.lengths
    for i, row_id in enumerate(ids):
        if row_id in done:
            continue
        message = prompts.errors[i] or mt_errors.get(i)
        n = int(lengths[i])
        limit = max_tokens[i]
        if message is None and max_context and n >= max_context:
            message = f"prompt has {n} tokens; the model's context is {max_context}"
        if message is not None:
            errors.append((i, message))
            continue
        if max_context:
            limit = min(limit, max_context - n)
        requests.append(Request(index=i, prompt_ids=prompts.tokens.row(i).tolist(), max_tokens=limit,
                                seed=row_seed(spec.sampling.seed, row_id)))
    return requests, errors


def plan_config(spec: JobSpec):
    from batchrun.plan.plan import PlanConfig

    return PlanConfig(step_tokens=spec.engine.step_tokens, block_size=spec.engine.block_size)


def _plan(spec: JobSpec, prompts: Prompts, requests: list):
    """Plan the runnable rows (prefix trie, sharing, order, packs); the plan's rows are ``requests``."""
    import numpy as np

    from batchrun.plan.plan import build_plan

    rows = np.array([r.index for r in requests], dtype=np.int64)
    plan = build_plan(prompts.tokens.take(rows), np.array([r.max_tokens for r in requests], dtype=np.int64),
                      plan_config(spec))
    if requests:  # (cheap numbers only: Plan.stats() would walk every pack)
        log.info("plan: %d rows, %d prompt tokens, %d after sharing, %d shared prefixes", len(requests),
                 plan.tokens.num_tokens, plan.prefill_tokens(), len(plan.prefixes))
    return plan


def _manifest(spec: JobSpec, job_info: dict[str, Any], loaded: Any, result: JobResult,
              source: Source, totals: dict[str, int]) -> dict[str, Any]:
    return {
        "job": spec.name,
        "complete": True,
        "spec_hash": spec.spec_hash(),
        "results_hash": job_info["results_hash"],
        "spec": spec.to_dict(),
        "model": {"path": spec.model.path, "resolved": loaded.resolved, "device": loaded.device,
                  "dtype": loaded.dtype},
        "engine": spec.engine.backend,
        "input": {"files": [asdict(f) for f in source.files], "id_column": source.id_column,
                  "generated_id": source.generated_id},
        "rows": {"total": totals["rows"], "ok": totals["rows"] - totals["error"], "error": totals["error"],
                 "this_run": result.rows_ok + result.rows_error, "from_earlier_runs": result.rows_skipped},
        "tokens": {"prompt": totals["prompt_tokens"], "output": totals["output_tokens"]},
        "timings": result.timings,
        "versions": _versions(),
        "finished_at": _now(),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"batchrun": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "duckdb", "pyarrow", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
