"""GPU: why the first engine run of a process is slower than the next ones on the same rows.

    python benchmarks/first_run.py --model 1b --workload fewshot --scale 0.25 --seed 4 --runs 3 \
        --out benchmarks/results/first-run-h200.jsonl

On the H200, 1b fewshot (0.25) took 1.39 s in a process's first timed run and 1.16 s in the next two, each
with a new engine (``benchmarks/results/suite-h200.jsonl``, the lines noted "three times in one process").
This runs the workload ``--runs`` times in one process, each with a new engine warmed up on 16 rows as
``gpu_bench.py`` does, each timed run under the torch profiler, and writes a line per run: wall time, GPU
busy, and the host's time by operator and by CUDA call (self time, summed), and the longest single host
calls. The first run's line also has what it spent more than the last run, by name: a first-use cost shows
there (``cudaHostAlloc`` for pinned host blocks, ``cuModuleLoad*`` or a slow first launch for lazily loaded
kernels, ``aten::mm`` for cuBLAS's per-shape choices, ...). ``--tiny`` runs a 2-layer model on the CPU: a
check that the script runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from gpu_bench import MODELS, _Ids, random_model, warmed_engine
from gpu_trace import summarize
from results_io import git_commit, record

from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Request
from batchrun.plan.plan import PlanConfig, build_plan

TOP = 25


def host_time(prof) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Host (CPU-side) self time in seconds by event name, and the longest single host events."""
    by_name: dict[str, float] = {}
    longest: list[tuple[str, float]] = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        s = e.self_cpu_time_total / 1e6
        by_name[e.name] = by_name.get(e.name, 0.0) + s
        longest.append((e.name, s))
    longest.sort(key=lambda x: -x[1])
    return by_name, longest[:TOP]


def one_run(loaded: LoadedModel, reqs: list[Request], plan, device: str) -> dict:
    engine, _ = warmed_engine(loaded, reqs, plan)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    forward, spent = engine.runner.forward, []

    def timed(*a, **k):  # (host time of each step's forward: its launches, and any first-use cost in them)
        t0 = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            spent.append(round((time.perf_counter() - t0) * 1000, 2))

    engine.runner.forward = timed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        n = sum(len(b) for b in engine.run(reqs, plan))
        sync()
        wall = time.perf_counter() - t
    assert n == len(reqs)
    trace = summarize(prof, wall)
    by_name, longest = host_time(prof)
    return {"wall_s": round(wall, 3), "gpu_busy": round(trace["busy"], 3), "steps": engine.stats["steps"],
            "launches": trace["launches"], "forward_host_ms": spent, "by_name": by_name, "longest": longest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--workload", default="fewshot", choices=workloads.NAMES)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=None, help="override the row count (a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: check the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    name = "tiny" if args.tiny else args.model
    model = random_model(name, device)
    loaded = LoadedModel(model, _Ids(), device, "bfloat16", f"random:{name}", f"random:{name}", [], 8192)
    w = workloads.make(args.workload, scale=args.scale, rows=args.rows, seed=args.seed)
    reqs = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
            for i in range(len(w.tokens))]
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig())
    # The profiler's own start-up (CUPTI) is paid here, not in the first timed run.
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])):
        torch.ones(8, device=device).sum().item()
    runs = []
    for _ in range(args.runs):
        if device == "cuda":
            torch.cuda.empty_cache()
        runs.append(one_run(loaded, reqs, plan, device))
    last = runs[-1]["by_name"]
    more = sorted(((k, v - last.get(k, 0.0)) for k, v in runs[0]["by_name"].items()), key=lambda x: -x[1])
    more = [(k, round(v, 4)) for k, v in more[:TOP] if v >= 5e-5]
    first_ms, last_ms = runs[0]["forward_host_ms"], runs[-1]["forward_host_ms"]
    slower = sorted(((i, a, b) for i, (a, b) in enumerate(zip(first_ms, last_ms))), key=lambda x: x[2] - x[1])
    for i, r in enumerate(runs):
        by_name = r.pop("by_name")
        row = {"bench": "first-run", "model": name, "workload": args.workload, "scale": args.scale,
               "seed": args.seed, "run": i + 1, "rows": len(reqs), **r,
               "host_s": sorted(((k, round(v, 4)) for k, v in by_name.items()), key=lambda x: -x[1])[:TOP],
               "longest": [(k, round(v, 4)) for k, v in r["longest"]]}
        if i == 0 and len(runs) > 1:
            row["more_than_last_s"] = more
            row["slower_steps"] = slower[:TOP]  # (step, first run's host ms in forward, last run's)
        row |= {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
        record(row, args.out)
        print(f"run {i + 1}: {row['wall_s']} s, GPU busy {row['gpu_busy']}, {row['steps']} steps, host time in "
              f"forward {sum(row['forward_host_ms']):.0f} ms", flush=True)
    if len(runs) > 1:
        print("the first run's host time beyond the last run's, by name:")
        for k, v in more:
            print(f"  {v * 1000:9.1f} ms  {k}")
        print("the steps whose forward took the host longest beyond the last run's (step: first, last ms):")
        for i, a, b in slower[:10]:
            print(f"  step {i}: {a} ms, {b} ms")


if __name__ == "__main__":
    main()
