"""Shard balance of the four benchmark workloads (../shared/BENCHMARKS.md) for 1 to 8 workers (CPU only).

    python benchmarks/shard_balance.py [--scale 1] [--seed 0] [--workers 2 4 8]

For each workload and worker count: the shards ``plan/shards.py`` cuts (4 a worker), their balance (largest
shard's cost over the mean; the ideal is 1.0), the prefix tokens computed more than once, and, as a share of
the job, the work a worker gets at most when the shards are handed out largest first to the next free
worker (``worker_balance``: the busiest worker's cost over the mean). One JSON line each, appended to
benchmarks/results/shards-cpu.jsonl.
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.plan.shards import shard_plan

RESULTS = Path(__file__).resolve().parent / "results" / "shards-cpu.jsonl"


def greedy_workers(costs: np.ndarray, workers: int) -> np.ndarray:
    """Each worker's total when shards (largest first) go to the worker that frees up first."""
    heap = [(0, w) for w in range(workers)]
    loads = np.zeros(workers, dtype=np.int64)
    for c in costs:
        load, w = heapq.heappop(heap)
        loads[w] = load + int(c)
        heapq.heappush(heap, (loads[w], w))
    return loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    for name in workloads.NAMES:
        w = workloads.make(name, scale=args.scale, seed=args.seed)
        plan = build_plan(w.tokens, w.max_tokens, PlanConfig())
        for n in args.workers:
            t = time.monotonic()
            shards = shard_plan(plan, n)
            loads = greedy_workers(shards.cost, n)
            row = {"bench": "shards", "workload": name, "scale": args.scale, "seed": args.seed, "rows": len(w),
                   "workers": n,
                   **shards.report(), "cost": None, "shard_s": round(time.monotonic() - t, 3),
                   "worker_balance": round(float(loads.max() / loads.mean()), 3),
                   "duplicated_share": round(shards.duplicated_prefill / float(shards.cost.sum()), 4),
                   "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
            print({k: row[k] for k in ("workload", "workers", "shards", "balance", "worker_balance",
                                       "duplicated_prefill_tokens", "duplicated_share")})
            record(row, args.out)


if __name__ == "__main__":
    main()
