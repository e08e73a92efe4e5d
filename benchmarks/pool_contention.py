"""Does llguidance's pool slow the thread that launches the steps, and how long does a pool call take to start?

The engine's mask worker runs a step's grammar work (960 rows take a token, then compute their masks, in
llguidance's pool) while the launching thread runs the model's Python. On the H200's virtual machine a step's
launches took longer in constrained runs than in their replays (``benchmarks/constraint_gpu.py --phases``).
This separates the causes without a model: the launching thread is a Python loop of fixed work
(``--main-ms`` alone), timed alone and while the worker does the grammar work of one step; and the grammar work
is timed alone (back to back), after the pool slept (``--gap-ms``: its threads have gone idle), and alongside
the loop. Each for several pool sizes and placements (the pool on the upper half of the CPUs and the loop on
the lower, as the engine does, or both anywhere). Medians over ``--steps`` steps, in ms.

    python benchmarks/pool_contention.py --tokenizer .tok [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grammar_take import SCHEMA, TEXT
from results_io import git_commit, record


def spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def main() -> None:
    from llguidance import LLExecutor, LLMatcher
    from transformers import AutoTokenizer

    from batchrun.engine.constraints import compile_constraint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--rows", type=int, default=960)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--main-ms", type=float, default=15.0)
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--threads", default="2,6,12")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.setswitchinterval(0.0002)  # (the engine's, with the mask worker)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    comp = compile_constraint("json_schema", SCHEMA, tok)
    start = tok.encode('{"product": "', add_special_tokens=False)
    word = tok.encode(TEXT, add_special_tokens=False)[1]
    words = (comp.tokenizer.vocab_size + 31) // 32
    out = np.zeros((args.rows, words), dtype=np.int32)
    cpus = sorted(os.sched_getaffinity(0))
    lower, upper = cpus[: len(cpus) // 2], cpus[len(cpus) // 2 :]
    n = 200_000
    t = time.perf_counter()
    spin(n)
    n = max(1000, int(n * args.main_ms / 1000 / (time.perf_counter() - t)))
    row = {"bench": "pool-contention", "rows": args.rows, "cpus": len(cpus), "main_ms_target": args.main_ms,
           "gap_ms": args.gap_ms, "steps": args.steps}

    def med(xs):
        return round(1000 * float(np.median(xs)), 3)

    for where in ("split", "all"):
        for threads in (int(x) for x in args.threads.split(",")):
            if where == "split":
                os.sched_setaffinity(0, upper)
            pool = LLExecutor(threads)
            matchers = [LLMatcher(comp.tokenizer, comp.grammar, log_level=0) for _ in range(args.rows)]
            for m in matchers:
                m.consume_tokens(start)
            os.sched_setaffinity(0, lower if where == "split" else cpus)
            pairs = [(m, i) for i, m in enumerate(matchers)]

            def grammar_step(pool=pool, matchers=matchers, pairs=pairs) -> float:
                t0 = time.perf_counter()
                pool.consume_token_par([(m, word) for m in matchers])
                pool.unsafe_compute_mask_ptr(pairs, out.ctypes.data, words * 4, args.rows)
                return time.perf_counter() - t0

            res: dict[str, list[float]] = {k: [] for k in ("main_alone", "pool_alone", "pool_after_gap",
                                                           "main_with_pool", "pool_with_main")}
            for _ in range(3):
                grammar_step()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                spin(n)
                res["main_alone"].append(time.perf_counter() - t0)
                res["pool_alone"].append(grammar_step())
                time.sleep(args.gap_ms / 1000)
                res["pool_after_gap"].append(grammar_step())
                took: list[float] = []
                th = threading.Thread(target=lambda took=took, step=grammar_step: took.append(step()))
                t0 = time.perf_counter()
                th.start()
                spin(n)
                res["main_with_pool"].append(time.perf_counter() - t0)
                th.join()
                res["pool_with_main"].append(took[0])
            os.sched_setaffinity(0, cpus)
            key = f"{where}_t{threads}"
            row[key] = {k: med(v) for k, v in res.items()} | {
                "main_slowdown": round(float(np.median(res["main_with_pool"]) / np.median(res["main_alone"])), 3)}
            print(key, row[key], flush=True)
    row |= {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, args.out)


if __name__ == "__main__":
    main()
