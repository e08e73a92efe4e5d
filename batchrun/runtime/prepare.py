"""The one preparation path of a job: read the input, build and tokenize the prompts, sort rows into engine
requests and row errors, and plan the requests. ``submit``, ``plan`` and the benchmarks all start here.

It takes a tokenizer and the model's context length, never the model: ``plan`` prepares a job without
loading any weights. It writes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from batchrun.engine.constraints import CompiledConstraint
from batchrun.engine.requests import Request, row_seed
from batchrun.errors import InputDataError, SpecError
from batchrun.io.json_arrow import arrow_type
from batchrun.io.prompts import Prompts, build_prompts, request_prompts
from batchrun.io.sink import BATCHPROMPT_FIELDS, RESERVED_COLUMNS, SAMPLE, TOKENS
from batchrun.io.source import Source, read_source, require_columns
from batchrun.plan.plan import Plan, PlanConfig, build_plan
from batchrun.runtime.assemble import Assembler, make_assembler
from batchrun.runtime.row_constraints import ConstraintUse, json_schema_value, row_constraints
from batchrun.runtime.row_sampling import RowSampling, row_sampling
from batchrun.spec import JobSpec
from batchrun.spec_sampling import ConstraintSpec

log = logging.getLogger("batchrun")


@dataclass
class PreparedJob:
    """Everything known about a job before the engine runs (rows are positions in ``source.table``)."""

    source: Source
    columns: list[str]  # passthrough input columns copied to the output (the id column not included)
    ids: list[Any]  # each row's id, in input order
    prompts: Prompts
    requests: list[Request]  # for the rows still to run (not committed earlier, no error), in input order
    request_rows: np.ndarray  # int64 [requests]: the input row each request prompts from
    errors: list[tuple[int, str]]  # (row, message): rows still to run that fail before the engine
    plan: Plan  # over ``requests``: plan row k is ``requests[k]``
    assembler: Assembler  # input rows -> requests; completions -> output rows
    timings: dict[str, float] = field(default_factory=dict)  # read_s, tokenize_s, plan_s
    constraint: ConstraintUse | None = None  # sampling.constraint: what was compiled, what it costs
    batchprompt: Any = None  # mode: batchprompt: its work (``runtime.batchprompt_job.BatchPromptWork``);
    # ``requests`` and ``plan`` are then its first round's
    spec: Any = None  # the job as run (``JobSpec``): with input.format openai_batch, the lines' settings read
    # from their columns (``batch_file_job``)

    @property
    def num_rows(self) -> int:
        return self.source.num_rows

    def outputs(self, rows: Collection[int] | None = None) -> int:
        """Output rows of the input ``rows`` (indices; None: all): ``sampling.n`` each, or each OpenAI batch
        line's own n."""
        count = self.num_rows if rows is None else len(rows)
        samples = getattr(self.assembler, "samples", None)
        if samples is None:
            return count
        return sum(samples(r) for r in (range(self.num_rows) if rows is None else rows))


def prepare(spec: JobSpec, tokenizer: Any, max_context: int | None,
            done: Collection[Any] = frozenset()) -> PreparedJob:
    """Prepare ``spec``'s rows whose ids are not in ``done`` (the ids an earlier run committed)."""
    if spec.mode == "batchprompt":
        from batchrun.runtime.batchprompt_job import prepare_batchprompt

        return prepare_batchprompt(spec, tokenizer, max_context, done)
    timings = {}
    t = time.monotonic()
    source = read_source(spec.input)
    if spec.input.format == "openai_batch":
        spec, source = batch_file_job(spec, source)
    columns = output_columns(spec, source)
    max_tokens, mt_errors = row_max_tokens(spec, source)
    sampling = row_sampling(spec, source)
    timings["read_s"] = time.monotonic() - t
    log.info("read %d rows from %d file(s)", source.num_rows, len(source.files))

    t = time.monotonic()
    if spec.prompt is None:  # (an OpenAI batch file: the lines' messages or prompts)
        prompts = request_prompts(source.table, tokenizer)
    else:
        prompts = build_prompts(spec.prompt, source.table, tokenizer)
    timings["tokenize_s"] = time.monotonic() - t

    constraints, c_errors, use = row_constraints(spec, source, tokenizer)
    ids = source.table.column(source.id_column).to_pylist()
    c = spec.sampling.constraint
    row_n = source.table.column("n").to_pylist() if spec.input.format == "openai_batch" else None
    assembler = make_assembler(spec.sampling.n, prompts.tokens.lengths, json_output=output_json_type(c),
                               row_n=row_n, logprobs=spec.sampling.logprobs,
                               choices=c is not None and c.kind == "choices")
    requests, rows, errors = build_requests(spec, ids, prompts, max_tokens,
                                            {**sampling.errors, **c_errors, **mt_errors}, max_context,
                                            done, assembler, constraints, sampling)
    t = time.monotonic()
    plan = plan_requests(spec, prompts, requests, rows)
    timings["plan_s"] = time.monotonic() - t
    return PreparedJob(source, columns, ids, prompts, requests, rows, errors, plan, assembler, timings, use,
                       spec=spec)


def batch_file_job(spec: JobSpec, source: Source) -> tuple[JobSpec, Source]:
    """An OpenAI batch file's job as its lines ask (``io.openai_batch``): max_tokens, temperature, top_p, stop
    and seed read from their columns, a line that leaves one out taking the spec's value; ``n``: the most any
    line asks (``batchrun export`` gives each line the first n it asked for); ``logprobs``: the most
    alternatives any line asks (or the spec's); a ``response_format``: that row's constraint (rows without one
    take the spec's constraint, if any)."""
    s, t = spec.sampling, source.table
    defaults = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                "n": s.n}
    for name, default in defaults.items():
        t = t.set_column(t.schema.get_field_index(name), name,
                         pa.array([default if v is None else v for v in t.column(name).to_pylist()],
                                  t.schema.field(name).type))
    t = t.set_column(t.schema.get_field_index("stop"), "stop",
                     pa.array([list(s.stop) if v is None else v for v in t.column("stop").to_pylist()],
                              pa.list_(pa.string())))
    asked = [v for v in t.column("logprobs").to_pylist() if v is not None]
    logprobs = max([*asked, *([s.logprobs] if s.logprobs is not None else [])], default=None)
    constraint = s.constraint
    if any(v is not None for v in t.column("constraint").to_pylist()):
        job_wide = None if s.constraint is None else json.dumps(
            {s.constraint.kind: json_schema_value(s.constraint) if s.constraint.kind == "json_schema"
             else getattr(s.constraint, s.constraint.kind)})
        t = t.set_column(t.schema.get_field_index("constraint"), "constraint",
                         pa.array([job_wide if v is None else v for v in t.column("constraint").to_pylist()],
                                  pa.string()))
        constraint = ConstraintSpec(column="constraint")
    sampling = s.model_copy(update={"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                                    "seed": "seed", "stop": {"column": "stop"}, "logprobs": logprobs,
                                    "n": max(t.column("n").to_pylist(), default=s.n), "constraint": constraint})
    return spec.model_copy(update={"sampling": sampling}), replace(source, table=t)


def output_json_type(c: ConstraintSpec | None) -> pa.DataType | None:
    """The ``output_json`` column's type: a struct when a job-wide JSON schema fixes one, JSON text for other
    schemas and per-row constraints, none without a JSON schema."""
    if c is None or c.kind not in ("json_schema", "column"):
        return None
    return (arrow_type(json_schema_value(c)) if c.kind == "json_schema" else None) or pa.string()


def output_columns(spec: JobSpec, source: Source) -> list[str]:
    """The input columns the output keeps: ``output.columns``, or every column; never a result column (nor,
    with ``sampling.n`` > 1, ``sample``)."""
    names = source.table.column_names
    reserved = RESERVED_COLUMNS + ([SAMPLE.name] if spec.sampling.n > 1 else [])
    if spec.mode == "batchprompt":
        reserved = reserved + [f.name for f in BATCHPROMPT_FIELDS]
    if spec.sampling.logprobs is not None:
        reserved = [*reserved, TOKENS.name]
    if spec.output.columns is None:
        cols = [c for c in names if c != source.id_column]
        clash = [c for c in cols if c in reserved]
        if clash:
            raise SpecError(f"output.columns: input column(s) {clash} would clash with result columns "
                            f"{reserved}; list the columns to keep in output.columns")
        return cols
    require_columns(source.table, list(spec.output.columns), "output.columns")
    clash = [c for c in spec.output.columns if c in reserved]
    if clash:
        raise SpecError(f"output.columns: {clash} clash with result columns {reserved}")
    return list(dict.fromkeys(c for c in spec.output.columns if c != source.id_column))


def row_max_tokens(spec: JobSpec, source: Source) -> tuple[list[int], dict[int, str]]:
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


def build_requests(spec: JobSpec, ids: list[Any], prompts: Prompts, max_tokens: list[int],
                   mt_errors: dict[int, str], max_context: int | None,
                   done: Collection[Any], assembler: Assembler,
                   constraints: Sequence[CompiledConstraint | None] | None = None,
                   sampling: RowSampling | None = None,
                   ) -> tuple[list[Request], np.ndarray, list[tuple[int, str]]]:
    """Requests for the rows still to run (as ``assembler`` makes them, with each row's seed and, if it has its
    own, sampling settings: ``sampling``; None: the job's), the input row of each, and (row, message) for rows
    that fail before the engine: a prompt that failed to render, a bad per-row value (max_tokens, sampling,
    constraint), a prompt that does not fit the model's context. A prompt that fits but leaves less room than
    max_tokens is generated up to the context length."""
    requests, rows, errors = [], [], []
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
        compiled = constraints[i] if constraints else None
        seed = spec.sampling.seed if sampling is None else sampling.seeds[i]
        made = assembler.requests(i, prompts.tokens.row(i).tolist(), limit, row_seed(seed, row_id),
                                  None if compiled is None else compiled.new,
                                  None if sampling is None or sampling.params is None else sampling.params[i])
        requests += made
        rows += [i] * len(made)
    return requests, np.array(rows, dtype=np.int64), errors


def plan_config(spec: JobSpec) -> PlanConfig:
    return PlanConfig(step_tokens=spec.engine.step_tokens, block_size=spec.engine.block_size)


def plan_requests(spec: JobSpec, prompts: Prompts, requests: list[Request], rows: np.ndarray) -> Plan:
    """Plan the requests (prefix trie, sharing, order, packs); the plan's rows are ``requests``, whose
    prompts are the input rows ``rows``."""
    plan = build_plan(prompts.tokens.take(rows), np.array([r.max_tokens for r in requests], dtype=np.int64),
                      plan_config(spec))
    if requests:  # (cheap numbers only: Plan.stats() would walk every pack)
        log.info("plan: %d rows, %d prompt tokens, %d after sharing, %d shared prefixes", len(requests),
                 plan.tokens.num_tokens, plan.prefill_tokens(), len(plan.prefixes))
    return plan
