"""The Python API; the CLI is a thin layer over it. Usable from an Airflow task or a notebook::

    from batchrun import load_spec, submit
    result = submit(load_spec("jobs/example.yaml", ["sampling.max_tokens=4"]))

Every function raises a ``batchrun.errors.BatchrunError`` subclass (with ``exit_code``) on a failure the
user can fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchrun.io.outdir import OutputState, path_problem, read_state
from batchrun.io.prompts import check_templates, compile_template
from batchrun.io.store import open_store
from batchrun.runtime.job import JobResult, run_job
from batchrun.runtime.progress import Progress
from batchrun.spec import JobSpec, load_spec

__all__ = ["JobResult", "PlanReport", "doctor", "export", "plan", "status", "submit", "validate"]


def _spec(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else load_spec(spec, overrides)


def validate(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Check a spec without reading input or loading a model: fields, values, template syntax."""
    job = _spec(spec, overrides)
    check_templates(job.prompt)
    if job.batchprompt is not None:
        compile_template("batchprompt.item_template", job.batchprompt.item_text)
        compile_template("batchprompt.answer_template", job.batchprompt.answer_template)
    return job


def submit(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = (), *, fresh: bool = False,
           progress: Progress | None = None) -> JobResult:
    """Run a job to completion and return its summary. Committed rows of an earlier run of the same job
    are kept (never duplicated); ``fresh`` deletes batchrun's files in the output directory first."""
    return run_job(validate(spec, overrides), fresh=fresh, progress=progress)


@dataclass
class PlanReport:
    """What ``batchrun plan`` prints: the job's size, what sharing saves, how the work packs and runs."""

    job: str
    rows: int
    rows_error: int  # rows that fail before the engine (template, null, context): reported, not planned
    prompt_tokens: int
    unique_tokens: int  # nodes of the global prefix trie: prefill with perfect sharing
    prefill_tokens: int  # what the plan computes: shared prefixes once, each row's own tokens
    saving_ratio: float  # 1 - prefill_tokens / prompt_tokens
    shared_prefixes: int
    prefix_levels: int
    share_degree: dict
    packs: int
    pack_capacity: int
    packing_efficiency: float  # packed tokens / (packs * capacity)
    max_output_tokens: int
    kv_budget_tokens: int  # what submit uses (on CUDA an estimate: see plan)
    projected_kv_peak: int  # simulated with every row running to max_tokens
    estimated_steps: int
    rows_too_big: int  # rows that cannot fit the KV budget even alone
    plan_s: float
    # sampling.constraint: kind, constrained rows, grammars compiled and the time that took; each generated
    # token of a constrained row also costs one token mask on the CPU (the manifest reports their time)
    constraint: dict[str, Any] | None = None
    # mode: batchprompt: the layout, the shared instruction, the rounds, and single-item prompts' cost (the
    # figures above are then the first round's prompts)
    batchprompt: dict[str, Any] | None = None
    # with ``workers``: the plan cut into shards along the prefix trie (``plan.shards``): their count, cost
    # (prefill tokens + estimated outputs), balance (largest / mean) and the prefix tokens computed again
    shards: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(spec: JobSpec | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
         workers: int | None = None) -> PlanReport:
    """A dry run: read the input, tokenize, build the plan and simulate it under the KV budget ``submit``
    would use (no model weights, no output). On CUDA the budget is an estimate: ``submit`` measures the free
    memory after loading the weights; ``plan`` subtracts their computed size from the free memory now."""
    from batchrun.engine import loader
    from batchrun.engine.batch import overlaps
    from batchrun.engine.factory import kv_budget
    from batchrun.engine.simulate import simulate
    from batchrun.plan.shards import shard_plan
    from batchrun.runtime.prepare import prepare

    job = validate(spec, overrides)
    workers = workers or _workers(job)
    resolved = loader.resolve(job.model)
    tokenizer = loader.load_tokenizer(job.model, resolved)
    facts = loader.model_facts(job.model, job.engine, resolved, count_weights=True, tokenizer=tokenizer)
    prepared = prepare(job, tokenizer, facts.max_context)
    budget = kv_budget(job.engine, facts, prepared.requests)
    stats = prepared.plan.stats()
    sim = simulate(prepared.plan, budget, overlap=overlaps(prepared.requests, (prepared.spec or job).sampling.logprobs))
    return PlanReport(job=job.name, rows=prepared.num_rows, rows_error=len(prepared.errors),
                      **{k: stats[k] for k in ("prompt_tokens", "unique_tokens", "prefill_tokens", "saving_ratio",
                                               "shared_prefixes", "prefix_levels", "share_degree", "packs",
                                               "pack_capacity", "packing_efficiency", "max_output_tokens")},
                      kv_budget_tokens=budget, projected_kv_peak=sim.peak_kv_tokens,
                      estimated_steps=sim.steps, rows_too_big=len(sim.rows_too_big),
                      plan_s=round(prepared.timings["plan_s"], 3),
                      constraint=({k: v for k, v in prepared.constraint.report().items()
                                   if k in ("kind", "rows", "grammars", "compile_s")} if prepared.constraint else None),
                      batchprompt=prepared.batchprompt.plan_report() if prepared.batchprompt else None,
                      shards=shard_plan(prepared.plan, workers).report() if workers else None)


def _workers(job: JobSpec) -> int | None:
    """The workers ``submit`` would start (``engine.devices`` as a list; auto: this host's GPUs), or None."""
    from batchrun.runtime.distribute import local_devices

    e = job.engine
    if e.devices is None or (e.executor == "ray" and not isinstance(e.devices, list)):
        return None  # (one device; or Ray's auto: the cluster decides)
    n = len(local_devices(e))
    return n if n > 1 else None


def status(output_dir: str | Path) -> dict[str, Any]:
    """What an output directory (local, or an ``s3://``/``gs://`` prefix) holds: complete, incomplete
    (resumable), damaged (``problems`` says what is wrong, ``fix`` what to do), empty, not_batchrun (files
    batchrun did not write), not_a_directory, or missing (an object store's missing bucket included). Reads
    only: never writes, never follows a symbolic link inside the directory."""
    store = open_store(output_dir)
    problem = path_problem(store)
    # (a URL without a prefix would list a whole bucket: it is reported, not read)
    state = OutputState(str(output_dir), False, False, False, None, None, is_dir=False) if (
        problem and store.remote and not store.prefix) else read_state(store)
    if problem:
        kind = "not_a_directory" if state.exists or not store.remote else "missing"
    elif not state.exists:
        kind = "missing"
    elif not state.owned:
        kind = "not_batchrun" if state.foreign else "empty"
    elif state.damaged:
        kind = "damaged"
    else:
        kind = "complete" if state.complete else "incomplete"
    out: dict[str, Any] = {"output": str(output_dir), "state": kind, "rows_committed": state.rows,
                           "parts": len(state.parts)}
    if problem:
        out["problems"] = [problem]
    if kind == "damaged":
        out["problems"] = state.problems + [f"{name}: not written by batchrun" for name in state.foreign]
        out["fix"] = ("remove the files batchrun did not write (it never deletes them), or choose another "
                      "output.path" if state.foreign else "batchrun submit --fresh rebuilds it (its results are "
                      "deleted and computed again)")
    if state.job:
        out["job"] = state.job.get("job")
        out["created_at"] = state.job.get("created_at")
    if state.manifest and state.complete:
        m = state.manifest
        out.update(rows=m.get("rows"), tokens=m.get("tokens"), timings=m.get("timings"),
                   model=m.get("model"), finished_at=m.get("finished_at"))
    return out


EXPORT_FORMATS = ("openai_batch",)


def export(output_dir: str | Path, fmt: str, path: str | Path) -> dict[str, Any]:
    """Write a finished job's results in another format (the Parquet dataset stays as it is). ``openai_batch``
    (the job read an OpenAI batch file): the Batch API's output JSONL at ``path`` (one line per request that
    succeeded, ``response.body`` with ``choices`` and ``usage``) and its error JSONL beside it
    (``<name>.errors.jsonl``: one line per request that failed, with the row's error)."""
    import datetime

    from batchrun.errors import SpecError, UsageError
    from batchrun.io import openai_batch

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format: one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    state = read_state(output_dir)
    if not state.owned or not state.complete:
        what = "no batchrun job's output" if not state.owned else "not finished (rerun submit to finish it)"
        raise SpecError(f"{output_dir}: {what}; export reads a finished job's results")
    from batchrun.io.store import open_store

    store = open_store(output_dir)  # (a local directory or an object-store prefix)
    tables = [store.read_table(name) for name in state.parts]
    names = set(tables[0].column_names) if tables else set()
    if not {"custom_id", "url", "body"} <= names:
        raise SpecError(f"{output_dir}: not the output of a job with input.format openai_batch (no custom_id, url "
                        "and body columns)")
    rows = [r for t in tables for r in t.to_pylist()]
    rows.sort(key=lambda r: (r.get("line") or 0))
    finished = (state.manifest or {}).get("finished_at")
    created = int(datetime.datetime.fromisoformat(finished).timestamp()) if finished else 0
    for r in rows:
        r["created"] = created
    model = ((state.manifest or {}).get("model") or {}).get("path") or "batchrun"
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise UsageError(f"--output: the directory {str(target.parent)!r} does not exist")
    done, failed, errors_path = openai_batch.export(rows, str(model), target)
    return {"output": str(target), "errors": str(errors_path), "responses": done, "failed": failed}


def doctor(expect_gpu: bool = False) -> dict[str, Any]:
    """What this machine gives the engine: versions, torch's build (CUDA or CPU), the GPUs, what
    ``engine.device: auto`` picks and the attention backend there. ``expect_gpu``: a RuntimeFailure (exit 1)
    when no CUDA device is usable (a CPU build of torch, no driver, no device)."""
    from batchrun.engine.doctor import report
    from batchrun.errors import RuntimeFailure

    found = report()
    if expect_gpu and not found["gpus"]:
        why = ("torch is a CPU build: install a CUDA build (README, GPU machines)" if found["torch_build"] == "cpu"
               else "torch has CUDA but sees no device: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
        raise RuntimeFailure(f"no usable GPU: {why}")
    return found
