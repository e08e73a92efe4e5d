"""Host work per engine step (CPU, no model): what the scheduler and the paged backend's layout cost on the
CPU for each step of the GPU suite's workloads. With overlapped steps the GPU waits on exactly this when it
is longer than the step's GPU time (1b rag on the H200: about 5 ms of GPU work per step).

    python benchmarks/host_steps.py --out benchmarks/results/host-steps-cpu.jsonl

The scheduler runs each workload's plan as the engine would, overlapped (``launched`` then ``resolve`` one
step later), every row producing all its ``max_tokens``; each step is laid out by the paged backend
(``_layout``: its kernel metadata as host arrays). Times are per step, best of ``--repeat`` runs. Run it
with nothing else on the machine. Each line also counts the steps and the decode-only ones (the tail after
the last prefill), which depend on the plan's row order and the pool, not on the machine:

    python benchmarks/host_steps.py --workloads fewshot,rag --scale 1 --pool-tokens 923408 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

from batchrun.engine.attention.paged import PagedBackend
from batchrun.engine.kv import KVManager
from batchrun.engine.requests import Request
from batchrun.engine.scheduler import Scheduler
from batchrun.plan.plan import PlanConfig, build_plan

SCALES = {"fewshot": 0.25, "rag": 0.25, "templates": 0.0625, "noshare": 0.125}


def run_once(w, pool_tokens: int = 2_000_000, longest_first: bool = True) -> dict:
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig(longest_first=longest_first))
    reqs = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
            for i in range(len(w.max_tokens))]
    kv = KVManager(plan.prefixes, pool_tokens // 16, 16)
    sched = Scheduler(plan, reqs, kv, plan.config.step_tokens, [])
    # The paged backend's tile sizes for the 1b model (4 query heads per KV head: 16 / 4 and 128 / 4 tokens).
    layout = types.SimpleNamespace(block_m=4, wide_m=32, block_size=16)
    spent = {"schedule": 0.0, "layout": 0.0, "resolve": 0.0}
    steps = decode_rows = decode_only = 0
    inflight = None
    while True:
        t = time.perf_counter()
        step = None if sched.finished() else sched.next_step()
        spent["schedule"] += time.perf_counter() - t
        if step is None and inflight is None:
            break
        launched = None
        if step is not None and step.seqs:
            t = time.perf_counter()
            PagedBackend._layout(layout, step)
            spent["layout"] += time.perf_counter() - t
            sched.launched(step)
            launched, steps = step, steps + 1
            decode_rows += sum(s.decode for s in step.seqs)
            decode_only += all(s.decode for s in step.seqs)
        if inflight is not None:
            t = time.perf_counter()
            for e in sched.resolve(inflight, [0] * len(inflight.sample_keys)):
                if e.ended:
                    sched.finish(e.key)
            spent["resolve"] += time.perf_counter() - t
        inflight = launched
    return {"steps": steps, "decode_only_steps": decode_only, "decode_rows_per_step": round(decode_rows / steps, 1),
            **{f"{k}_ms_per_step": 1000 * v / steps for k, v in spent.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=None, help="every workload at this scale (default: SCALES)")
    ap.add_argument("--pool-tokens", type=int, default=2_000_000, help="the KV pool's size, tokens")
    ap.add_argument("--order", default="longest", choices=["longest", "ratio"],
                    help="the plan's row order among siblings (ratio: BatchLLM's alone, before 2026-12-01)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    names = list(SCALES) if args.workloads == "all" else args.workloads.split(",")
    for name in names:
        scale = args.scale or SCALES[name]
        w = workloads.make(name, scale=scale, seed=args.seed)
        runs = [run_once(w, args.pool_tokens, args.order == "longest") for _ in range(args.repeat)]
        best = {k: min(r[k] for r in runs) for k in runs[0] if k.endswith("_ms_per_step")}
        row = {"bench": "host-steps", "workload": name, "scale": scale, "seed": args.seed,
               "rows": len(w.max_tokens), "pool_tokens": args.pool_tokens, "order": args.order,
               "steps": runs[0]["steps"],
               "decode_only_steps": runs[0]["decode_only_steps"],
               "decode_rows_per_step": runs[0]["decode_rows_per_step"],
               **{k: round(v, 3) for k, v in best.items()}, "total_ms_per_step": round(sum(best.values()), 3),
               "cpus": os.cpu_count(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
               "note": args.note}
        record(row, args.out)


if __name__ == "__main__":
    main()
