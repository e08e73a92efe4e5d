"""The Python API; the CLI is a thin layer over it. Usable from an Airflow task or a notebook::

    from batchrun import load_spec, submit
    result = submit(load_spec("jobs/example.yaml", ["sampling.max_tokens=4"]))

Every function raises a ``batchrun.errors.BatchrunError`` subclass (with ``exit_code``) on a failure the
user can fix.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchrun.io.prompts import check_templates
from batchrun.io.sink import is_batchrun_file, read_state
from batchrun.runtime.job import JobResult, run_job
from batchrun.runtime.progress import Progress
from batchrun.spec import JobSpec, load_spec

__all__ = ["JobResult", "PlanReport", "plan", "status", "submit", "validate"]


def _spec(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else load_spec(spec, overrides)


def validate(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Check a spec without reading input or loading a model: fields, values, template syntax."""
    job = _spec(spec, overrides)
    check_templates(job.prompt)
    return job


def submit(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = (), *, fresh: bool = False,
           progress: Progress | None = None) -> JobResult:
    """Run a job to completion and return its summary. Committed rows of an earlier run of the same job
    are kept (never duplicated); ``fresh`` deletes batchrun's files in the output directory first."""
    return run_job(validate(spec, overrides), fresh=fresh, progress=progress)


@dataclass
class PlanReport:
    job: str
    rows: int
    rows_error: int
    prompt_tokens: int
    prompt_tokens_min: int
    prompt_tokens_mean: float
    prompt_tokens_max: int
    max_output_tokens: int  # sum of per-row max_tokens: an upper bound on generated tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PlanReport:
    """A dry run: reads the input and tokenizes the prompts (no model weights, no output written)."""
    from batchrun.engine.loader import load_tokenizer
    from batchrun.io.prompts import build_prompts
    from batchrun.io.source import read_source
    from batchrun.runtime.job import _max_tokens

    job = validate(spec, overrides)
    source = read_source(job.input)
    prompts = build_prompts(job.prompt, source.table, load_tokenizer(job.model))
    max_tokens, mt_errors = _max_tokens(job, source)
    ok = [i for i, e in enumerate(prompts.errors) if e is None and i not in mt_errors]
    lengths = [int(prompts.tokens.lengths[i]) for i in ok] or [0]
    return PlanReport(job=job.name, rows=source.num_rows, rows_error=source.num_rows - len(ok),
                      prompt_tokens=sum(lengths), prompt_tokens_min=min(lengths),
                      prompt_tokens_mean=round(statistics.fmean(lengths), 1), prompt_tokens_max=max(lengths),
                      max_output_tokens=sum(max_tokens[i] for i in ok))


def status(output_dir: str | Path) -> dict[str, Any]:
    """What an output directory holds: complete, incomplete (resumable), empty, or missing."""
    state = read_state(output_dir)
    if not state.exists:
        kind = "missing"
    elif not state.owned:
        foreign = any(not is_batchrun_file(f.name) for f in Path(output_dir).iterdir())
        kind = "not_batchrun" if foreign else "empty"
    else:
        kind = "complete" if state.complete else "incomplete"
    out: dict[str, Any] = {"output": str(output_dir), "state": kind, "rows_committed": state.rows,
                           "parts": len(state.parts)}
    if state.job:
        out["job"] = state.job.get("job")
        out["created_at"] = state.job.get("created_at")
    if state.manifest and state.complete:
        m = state.manifest
        out.update(rows=m.get("rows"), tokens=m.get("tokens"), timings=m.get("timings"),
                   model=m.get("model"), finished_at=m.get("finished_at"))
    return out
