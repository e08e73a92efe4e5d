"""GPU: the cost of JSON-schema token masks at a large batch (random-weight 1b model, BENCHMARKS.md fewshot
rows), batchrun's engine with and without the constraint in one process.

    python benchmarks/constraint_gpu.py --rows 512 --tokenizer .tok --out benchmarks/results/constraint-h200.jsonl

Three kinds of run over the same rows, each ``--repeat`` times, interleaved (the fastest of each is kept):
``free`` (no constraint), ``constrained`` (the JSON schema, llguidance's masks computed while the GPU runs
each step) and ``replay``: the constrained run's own tokens teacher-forced with no grammar
work (each step allows the one token the constrained run drew there, and the same forced runs are
appended), so it has the same steps, batches and tokens. ``mask_added_share`` = (constrained - replay) /
replay wall time (fastest runs; ``mask_added_share_median``: median runs) is what grammar work adds to the
whole run. ``step_added`` is the issue's own measure (at most 10% at a batch of 256 rows or more): each step
timed (planned to tokens recorded), the steps that sample at least ``--batch`` rows summed, each at its fastest
over the repeats (runs of one kind have the same steps; a step's fastest time is robust to the host's noise,
which moves whole runs by a third), against the replay's same steps. ``main_cpu_s``: the CPU time of the
thread that plans and launches the steps (what grammar work adds there, or slows there, against the replay's);
``mask_cpu_share_of_wall`` is the grammar work's CPU time, mostly hidden behind the GPU. More kinds, each
interleaved with the others and reported with its ``<kind>_added_share`` and ``step_added``: ``--masked``, the
constrained run with every mask computed (``BATCHRUN_LAZY_MASKS=0``: no row drawn before its mask) on the
launching thread once the step is launched (``BATCHRUN_MASK_WORKER=0``); ``--lazy``, the same with rows drawn
before their wide masks (``BATCHRUN_LAZY_MASKS=1``); ``--worker``, that in the worker thread while the step is
launched (``BATCHRUN_MASK_WORKER=1``); ``--worker --masked`` adds ``worker_masked`` too (every mask, in the
worker thread: on a GPU, the engine's default and so the ``constrained`` run's). ``--kind NAME:VAR=VALUE,...``
adds a constrained run under the given environment variables.

``--job`` runs a job spec's real model, rows and constraint instead, as ``batchrun submit`` prepares them: the
issue's own case, the extraction example on SmolLM2 (960 distinct rows: four variants of each English review):

    python benchmarks/constraint_gpu.py --job examples/extract.yaml --set engine.device=cuda \
        --set "input.sql=SELECT review_id || '-' || i AS review_id, product, label, CASE WHEN i = 0 THEN text \
               ELSE 'Review ' || i || '. ' || text END AS text FROM input CROSS JOIN range(4) t(i) WHERE lang = 'en'"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import thread_cpu
import workloads
from gpu_bench import random_model
from results_io import git_commit, record
from step_timing import PHASES, STEPS, grammar_load, pin_main, step_shares, time_phases, time_steps

from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import Grammar, compile_constraint, matcher_group
from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Request, SamplingParams
from batchrun.plan.plan import PlanConfig, build_plan

# The kinds of run the script makes itself (a --kind may not take their names): the unconstrained, the
# constrained (the engine's default) and its replay, then masked, every mask computed on the launching thread;
# lazy, rows drawn before their wide masks; worker, the grammar work in a worker thread; worker_masked, both.
BUILT_IN = ("warmup", "free", "constrained", "replay", "masked", "lazy", "worker", "worker_masked")


def custom_kinds(specs: list[str]) -> dict[str, dict[str, str]]:
    """``--kind NAME:VAR=VALUE,...``: each kind's environment variables."""
    out = {}
    for spec in specs:
        name, _, env = spec.partition(":")
        pairs = [p.partition("=") for p in env.split(",") if p]
        if not name or name in BUILT_IN or any(not v or not e for v, e, _ in pairs):
            raise SystemExit(f"--kind {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE...] with a new NAME")
        out[name] = {v: x for v, _, x in pairs}
    return out


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment", "complaints"],
          "properties": {"product": {"type": "string", "maxLength": 24},
                         "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "complaints": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 24}}}}


class Recording(Grammar):
    """A grammar that remembers the forced runs the engine appended (for ``Replay``)."""

    def __init__(self, compiled):
        super().__init__(compiled)
        self.runs: dict[int, list[int]] = {}

    def forced_after(self, generated):
        forced = super().forced_after(generated)
        if forced:
            self.runs[len(generated)] = forced
        return forced


class Replay:
    """Teacher forcing without grammar work: the tokens a constrained row drew, one allowed at each step, and
    the same forced runs appended after the same tokens."""

    def __init__(self, tokens, runs, eos):
        self.tokens, self.runs, self.eos = list(tokens), runs, eos

    def allowed_tokens(self, generated):
        n = len(generated)
        return [self.tokens[n]] if n < len(self.tokens) else [self.eos]

    def forced_after(self, generated):
        return self.runs.get(len(generated), [])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(loaded, plan, reqs) -> dict:
    """One run under the torch profiler: GPU busy fraction, launches per step, and the host's time in the CUDA
    calls that can wait for the device."""
    from gpu_trace import summarize
    from torch.profiler import ProfilerActivity, profile

    engine = BatchEngine(loaded, SamplingParams(), kv_budget_tokens=400_000)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        sum(len(b) for b in engine.run(reqs, plan))
        sync()
        wall = time.perf_counter() - t
    trace = summarize(prof, wall)
    waits: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and ("Synchronize" in e.name or "Memcpy" in e.name):
            waits[e.name] = waits.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    gpu = sum(trace["by_name"].values())
    return {"wall_s": round(wall, 3), "gpu_busy": round(trace["busy"], 3), "kernel_s": round(gpu, 3),
            "launches_per_step": round(trace["launches"] / engine.stats["steps"], 1),
            "host_cuda_waits_s": {k: round(v, 4) for k, v in sorted(waits.items(), key=lambda kv: -kv[1])[:6]},
            "top_kernels_s": {k[:60]: round(v, 4) for k, v in sorted(trace["by_name"].items(),
                                                                      key=lambda kv: -kv[1])[:6]}}


def random_inputs(args):
    """The random-weight model (``--model``; ``--tiny``: 2 layers on CPU) on BENCHMARKS.md's fewshot rows, with
    the schema above: (loaded model, prompts, max_tokens, plan, compiled constraint, model label)."""
    from transformers import AutoTokenizer

    device = "cpu" if args.tiny else "cuda"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = random_model("tiny" if args.tiny else args.model, device)
    loaded = LoadedModel(model, tok, device, "bfloat16", "random", "random", [tok.eos_token_id], 8192)
    w = workloads.make("fewshot", rows=args.rows, seed=1)
    plan = build_plan(w.tokens, np.full(args.rows, args.max_tokens), PlanConfig())
    prompts = [w.tokens.row(i).tolist() for i in range(args.rows)]
    return (loaded, prompts, [args.max_tokens] * args.rows, plan, compile_constraint("json_schema", SCHEMA, tok),
            "tiny" if args.tiny else args.model)


def job_inputs(args):
    """A job spec's model (a real one: the example's SmolLM2), rows, prompts, max_tokens and constraint, as
    ``batchrun submit`` prepares them (the same plan)."""
    from batchrun.engine.loader import load
    from batchrun.runtime.prepare import prepare
    from batchrun.spec import load_spec

    spec = load_spec(Path(args.job), args.overrides)
    if spec.sampling.constraint is None:
        raise SystemExit(f"{args.job}: the job has no sampling.constraint")
    loaded = load(spec.model, spec.engine)
    job = prepare(spec, loaded.tokenizer, loaded.max_context)
    compiled = job.constraint.compiled
    if len(compiled) != 1:
        raise SystemExit(f"{args.job}: one job-wide constraint expected, found {len(compiled)} grammars")
    return (loaded, [r.prompt_ids for r in job.requests], [r.max_tokens for r in job.requests], job.plan,
            compiled[0], str(spec.model.path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--model", default="1b", choices=["1b", "8b"], help="random-weight model (BENCHMARKS.md)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind (the fastest is reported)")
    ap.add_argument("--batch", type=int, default=256,
                    help="step_added: what grammar work adds to the steps that sample at least this many rows")
    ap.add_argument("--cprofile", default=None,
                    help="profile the thread that launches the steps in the first constrained and replay runs "
                         "(cProfile: written to PATH.constrained and PATH.replay)")
    ap.add_argument("--phases", action="store_true", help="add up the host time of the engine's phases")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (the GIL's)")
    ap.add_argument("--capture-after", type=int, default=None, help="the runner's CAPTURE_AFTER (an experiment)")
    ap.add_argument("--main-lower", action="store_true",
                    help="an experiment: the main thread on the lower half of the CPUs (the pool keeps to the upper)")
    ap.add_argument("--pin-main", action="store_true",
                    help="an experiment: the main thread alone on the first CPU, the grammar threads on the others")
    ap.add_argument("--masked", action="store_true",
                    help="also a constrained run with every mask computed (BATCHRUN_LAZY_MASKS=0), interleaved")
    ap.add_argument("--lazy", action="store_true",
                    help="also a constrained run drawing rows before their wide masks (BATCHRUN_LAZY_MASKS=1)")
    ap.add_argument("--worker", action="store_true",
                    help="also a constrained run with the grammar work in a worker thread while the step is "
                         "launched (BATCHRUN_MASK_WORKER=1, the first design), interleaved")
    ap.add_argument("--kind", dest="kinds", action="append", default=[], metavar="NAME:VAR=VALUE,...",
                    help="also a constrained run under these environment variables (the engine's settings), "
                         "interleaved; e.g. worker_all:BATCHRUN_MASK_WORKER=1,BATCHRUN_LAUNCHER_CPUS=all")
    ap.add_argument("--profile", action="store_true",
                    help="one more constrained and replay run each under the torch profiler: GPU busy, launches")
    ap.add_argument("--load", choices=["thread", "process"], default=None,
                    help="a diagnostic: grammar work with no step behind it (step_timing.grammar_load) during each "
                         "replay run, in a thread of this process or in a child process")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: check the script runs")
    ap.add_argument("--job", default=None,
                    help="a job spec instead of the random-weight model: its model, prompts, max_tokens and "
                         "constraint (a real model: examples/extract.yaml on SmolLM2; --rows is then ignored)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="with --job: a.b=value")
    args = ap.parse_args()
    if args.phases:
        time_phases()
    time_steps()
    if args.capture_after is not None:
        import batchrun.engine.runner as runner

        runner.CAPTURE_AFTER = args.capture_after
    if args.pin_main or args.main_lower:
        pin_main("lower" if args.main_lower else "first")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    loaded, prompts, max_tokens, plan, compiled, label = job_inputs(args) if args.job else random_inputs(args)
    rows, eos = len(prompts), loaded.eos_ids[0]

    def make(name: str, i: int):
        if name == "free":
            return None
        if name == "replay":
            return Replay(*recorded[i], eos)
        return Recording(compiled)

    def requests(name: str) -> list[Request]:
        return [Request(key=i, prompt_ids=prompts[i], max_tokens=max_tokens[i], constraint=make(name, i))
                for i in range(rows)]

    row = {"bench": "constraint-gpu", "model": label, "rows": rows, "max_tokens": max(max_tokens)}
    if args.job:
        row |= {"job": args.job, "overrides": args.overrides}
    recorded: dict[int, tuple] = {}
    lazy = os.environ.get("BATCHRUN_LAZY_MASKS", "auto")
    walls: dict[str, list[float]] = {}
    step_times: dict[str, list] = {}
    custom = custom_kinds(args.kinds)
    kinds = ("free", "constrained", "replay", *(("masked",) if args.masked else ()), *(("lazy",) if args.lazy else ()),
             *(("worker",) if args.worker else ()), *(("worker_masked",) if args.worker and args.masked else ()),
             *custom)
    others = [k for k in kinds if k not in ("free", "constrained", "replay")]
    saved = {var: os.environ.get(var) for env in custom.values() for var in env}
    for name in ("warmup", *[k for _ in range(args.repeat) for k in kinds]):
        for var, value in saved.items():  # (the custom kinds' variables as they were, then this kind's settings)
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        os.environ["BATCHRUN_LAZY_MASKS"] = ("0" if name in ("masked", "worker_masked") else "1" if name == "lazy"
                                             else lazy)  # (read as the engine runs)
        if name in ("masked", "lazy", "worker", "worker_masked"):
            os.environ["BATCHRUN_MASK_WORKER"] = "1" if name in ("worker", "worker_masked") else "0"
        else:  # (free, constrained, replay and custom kinds: the engine's default, the worker)
            os.environ.pop("BATCHRUN_MASK_WORKER", None)
        os.environ.update(custom.get(name, {}))
        compiled.renew()  # (the rows' matchers made anew, under this kind's BATCHRUN_SHARED_MATCHERS)
        reqs = requests(name)
        engine = BatchEngine(loaded, SamplingParams(), kv_budget_tokens=400_000)
        before = dict(compiled.stats)
        PHASES.clear()
        STEPS.clear()
        sync()
        prof = None
        if args.cprofile and name in ("constrained", "replay") and name not in row:  # (each kind's first run)
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        unload = grammar_load(compiled, args.load) if args.load and name == "replay" else None
        threads = thread_cpu.snapshot()
        t, cpu, every = time.perf_counter(), time.thread_time(), time.process_time()
        out = [c for batch in engine.run(reqs, plan) for c in batch]
        sync()
        wall, cpu, every = time.perf_counter() - t, time.thread_time() - cpu, time.process_time() - every
        threads = thread_cpu.busiest(threads, thread_cpu.snapshot())
        if unload is not None:
            unload()
        if prof is not None:
            prof.disable()
            prof.dump_stats(f"{args.cprofile}.{name}")
        if name in ("warmup", "constrained"):
            recorded = {c.key: (c.token_ids, reqs[c.key].constraint.runs) for c in out}
        if name == "warmup":
            continue
        walls.setdefault(name, []).append(round(wall, 3))
        if name != "free":  # (a free run overlaps its steps: not one step at a time)
            step_times.setdefault(name, []).append(list(STEPS))
        if name in row and row[name]["wall_s"] <= wall:
            continue
        # (process_cpu_s: every thread's CPU time, llguidance's pool and the mask worker included)
        row[name] = {"wall_s": round(wall, 3), "main_cpu_s": round(cpu, 3), "process_cpu_s": round(every, 3),
                     "thread_cpu": threads,
                     "steps": engine.stats["steps"], "graph_steps": engine.runner.graph_steps,
                     "output_tokens": sum(len(c.token_ids) for c in out),
                     "masks": compiled.stats["masks"] - before["masks"],
                     "mask_s": round(compiled.stats["mask_s"] - before["mask_s"], 3),
                     "mask_pool_s": round(compiled.stats.get("mask_pool_s", 0) - before.get("mask_pool_s", 0), 3),
                     "take_s": round(compiled.stats.get("take_s", 0) - before.get("take_s", 0), 3),
                     "take_rounds": round(compiled.stats.get("take_rounds", 0) - before.get("take_rounds", 0)),
                     "mask_wait_s": round(engine.stats["mask_wait_s"], 3),
                     "unmasked": compiled.stats.get("unmasked", 0) - before.get("unmasked", 0),
                     "unmasked_allowed": (compiled.stats.get("unmasked_allowed", 0)
                                          - before.get("unmasked_allowed", 0))}
        if args.phases:
            row[name]["phases_s"] = {k: round(v, 4) for k, v in PHASES.items()}
        if name in ("replay", *others):
            row[name]["same_tokens"] = all(c.token_ids == recorded[c.key][0] for c in out)
    if args.profile:
        for name in ("constrained", "replay"):
            row[name]["profile"] = profiled(loaded, plan, requests(name))
    c, r = row["constrained"], row["replay"]
    row["replay_same_steps"] = c["steps"] == r["steps"]
    row["mask_cpu_share_of_wall"] = round(c["mask_s"] / c["wall_s"], 4)
    # What grammar work adds to the steps: the constrained run against its own tokens replayed without it.
    row["mask_wait_share"] = round(c["mask_wait_s"] / c["wall_s"], 4)
    row["mask_added_share"] = round((c["wall_s"] - r["wall_s"]) / r["wall_s"], 4)  # (fastest runs)
    med = {k: float(np.median(v)) for k, v in walls.items()}
    row["walls_s"] = walls
    row["mask_added_share_median"] = round((med["constrained"] - med["replay"]) / med["replay"], 4)
    for kind in others:
        if kind in row:
            row[f"{kind}_added_share"] = round((row[kind]["wall_s"] - r["wall_s"]) / r["wall_s"], 4)
            row[f"{kind}_added_share_median"] = round((med[kind] - med["replay"]) / med["replay"], 4)
    # The measure: the steps at a batch of at least --batch rows, each at its fastest over the repeats.
    row["step_batch"] = args.batch
    row["step_added"] = step_shares(step_times, args.batch)
    row["lazy_masks"] = lazy  # (auto: rows drawn before their masks on the CPU only)
    row["mask_ms_each"] = round(1000 * c["mask_s"] / max(c["masks"], 1), 4)
    row["grammar_threads"] = os.environ.get("BATCHRUN_GRAMMAR_THREADS", "default")
    group = matcher_group()  # (rows per copied matcher, sharing llguidance's lexer)
    row["matcher_group"] = "all" if group is None else group
    row["switch_interval_s"] = sys.getswitchinterval()
    if args.pin_main or args.main_lower:
        row["pinned_main"] = "lower half" if args.main_lower else "first CPU"
    if args.load:
        row["replay_load"] = args.load
    if args.capture_after is not None:
        row["capture_after"] = args.capture_after
    gpu = torch.cuda.get_device_name() if loaded.device.startswith("cuda") else "cpu"
    row |= {"gpu": gpu, "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, args.out)


if __name__ == "__main__":
    main()
