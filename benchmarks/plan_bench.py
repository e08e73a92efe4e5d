"""Planner benchmark (CPU): time and extra memory to plan fewshot-shaped jobs, and tokenizer throughput.

    python benchmarks/plan_bench.py                 # 25k, 50k, 100k rows; tokenization; appends to results
    python benchmarks/plan_bench.py --million       # also 1M rows (needs ~10 GB of memory)

Planning = build_plan (trie, shared prefixes, order, lifetimes) + one pass over all prefill packs + stats.
Tokenization is excluded from planning and measured separately with the real SmolLM2 tokenizer (its Rust
core runs on every core). Extra memory = tracemalloc's peak during planning (numpy allocations included),
on top of the token table. Results go to benchmarks/results/plan-cpu.jsonl, one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

from batchrun.plan.plan import PlanConfig, build_plan

RESULTS = Path(__file__).resolve().parent / "results" / "plan-cpu.jsonl"


def _meta() -> dict:
    return {"commit": git_commit(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}


def plan_once(rows: int, seed: int = 0) -> dict:
    w = workloads.make("fewshot", rows=rows, seed=seed)
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig())
    t_build = time.perf_counter() - t0
    stats = plan.stats()  # iterates every prefill pack once
    t_total = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"bench": "plan", "workload": "fewshot", "rows": rows, "prompt_tokens": stats["prompt_tokens"],
            "unique_tokens": stats["unique_tokens"], "prefill_tokens": stats["prefill_tokens"],
            "saving_ratio": stats["saving_ratio"], "shared_prefixes": stats["shared_prefixes"],
            "packs": stats["packs"], "packing_efficiency": stats["packing_efficiency"],
            "build_plan_s": round(t_build, 3), "plan_and_packs_s": round(t_total, 3),
            "extra_memory_mb": round(peak / 2**20, 1), "token_table_mb": round(w.tokens.tokens.nbytes / 2**20, 1)}


def tokenize_once(rows: int) -> dict:
    from batchrun.engine.loader import load_tokenizer
    from batchrun.io.prompts import tokenize
    from batchrun.spec import ModelSpec

    tok = load_tokenizer(ModelSpec(path="smollm2-135m-instruct"))
    texts = workloads.make_texts("fewshot", rows=rows)
    t0 = time.perf_counter()
    table = tokenize(tok, list(texts))
    dt = time.perf_counter() - t0
    return {"bench": "tokenize", "workload": "fewshot", "rows": rows, "tokens": table.num_tokens,
            "seconds": round(dt, 3), "tokens_per_s": round(table.num_tokens / dt),
            "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all cores")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[25_000, 50_000, 100_000])
    ap.add_argument("--million", action="store_true", help="also plan 1,000,000 rows")
    ap.add_argument("--tokenize-rows", type=int, default=2000)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--tokenize-only", action="store_true", help=argparse.SUPPRESS)  # the 1-thread child run
    args = ap.parse_args()
    if args.tokenize_only:
        print(json.dumps(tokenize_once(args.tokenize_rows)), flush=True)
        return
    meta = _meta()

    def keep(r: dict) -> None:  # each measurement is written as soon as it exists
        record({**r, **meta}, None if args.no_write else RESULTS)

    if args.tokenize_rows:
        keep(tokenize_once(args.tokenize_rows))
        single = subprocess.run([sys.executable, __file__, "--tokenize-only", "--tokenize-rows",
                                 str(args.tokenize_rows)], capture_output=True, text=True,
                                env={**os.environ, "RAYON_NUM_THREADS": "1"})
        for line in single.stdout.splitlines():
            if line.startswith("{"):
                keep(json.loads(line))
    for rows in args.rows + ([1_000_000] if args.million else []):
        keep(plan_once(rows))


if __name__ == "__main__":
    main()
