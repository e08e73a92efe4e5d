"""GPU: where a batchrun run spends its time — GPU-busy fraction and kernel launches per engine step — from a
torch-profiler trace of the whole run (one workload, batchrun's engine, warmed up first).

    python benchmarks/profile_steps.py --workload rag --scale 0.25 --out benchmarks/results/profile-h200.jsonl

GPU busy = the union of all kernel intervals over the run's wall time; launches per step = CUDA kernel
launches / engine steps; the top kernels by GPU time are listed.
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

from batchrun.engine import attention
from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Request
from batchrun.plan.plan import PlanConfig, build_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--workload", default="rag", choices=workloads.NAMES)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--out", default=None)
    ap.add_argument("--python", type=int, default=0, metavar="N",
                    help="instead: profile the host side with cProfile and print its top N functions")
    args = ap.parse_args()
    model = random_model(args.model)
    loaded = LoadedModel(model, _Ids(), "cuda", "bfloat16", "random", "random", [], 8192)
    w = workloads.make(args.workload, scale=args.scale)
    reqs = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
            for i in range(len(w.tokens))]
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig())
    engine, _ = warmed_engine(loaded, reqs, plan)
    torch.cuda.synchronize()
    if args.python:
        import cProfile
        import pstats

        t = time.perf_counter()
        with cProfile.Profile() as cprof:
            sum(len(b) for b in engine.run(reqs, plan))
            torch.cuda.synchronize()
        print(f"{args.workload}: {time.perf_counter() - t:.2f} s under cProfile, {engine.stats}")
        pstats.Stats(cprof).sort_stats("tottime").print_stats(args.python)
        pstats.Stats(cprof).sort_stats("cumulative").print_stats(args.python)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        sum(len(b) for b in engine.run(reqs, plan))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    trace = summarize(prof, wall)
    steps = engine.stats["steps"]
    by_name = trace["by_name"]
    gpu_s = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    record({"bench": "profile", "model": args.model, "workload": args.workload, "scale": args.scale,
            "attention": attention.choose_backend("cuda", torch.bfloat16).name, "wall_s": round(wall, 3),
            "steps": steps, "kernels": trace["kernels"], "launches_per_step": round(trace["launches"] / steps, 1),
            "gpu_busy_fraction": round(trace["busy"], 3), "gpu_kernel_s": round(gpu_s, 3),
            "top_kernels": [{"name": n[:80], "s": round(s, 3), "share": round(s / gpu_s, 3)} for n, s in top],
            "note": "wall time is under the profiler (slower than an unprofiled run)",
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d")}, args.out)


if __name__ == "__main__":
    main()
