"""Does llguidance's pool speed up taking the tokens of a real run, as it does the masks? The example job
(``examples/extract.yaml``, SmolLM2, 240 rows) runs once constrained, greedy, on the CPU; its outputs, four
copies of each (960 rows), are then replayed through fresh matchers in lockstep, a token a row a step: each
step's tokens taken (``consume_token_par``, or one by one: ``seq``) and masks computed
(``unsafe_compute_mask_ptr``, or one by one). Seconds over the whole replay, per way and per pool size, with
the rows' matchers as the engine makes them (``BATCHRUN_SHARED_MATCHERS`` chooses). No model in the replay.

    python benchmarks/take_in_run.py [--threads 1,2] [--out benchmarks/results/take-in-run-cpu.jsonl]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constraint_gpu import Recording, job_inputs
from results_io import git_commit, record


def outputs(job: str) -> tuple[list[list[int]], object]:
    """Each row's tokens from one constrained greedy run of ``job`` on the CPU, and its compiled constraint."""
    from batchrun.engine.batch import BatchEngine
    from batchrun.engine.requests import Request, SamplingParams

    args = argparse.Namespace(job=job, overrides=["engine.device=cpu"])
    loaded, prompts, max_tokens, plan, compiled, _ = job_inputs(args)
    os.environ["BATCHRUN_LAZY_MASKS"] = "0"  # (every mask computed, as on a GPU)
    reqs = [Request(key=i, prompt_ids=prompts[i], max_tokens=max_tokens[i], constraint=Recording(compiled))
            for i in range(len(prompts))]
    done = [c for batch in BatchEngine(loaded, SamplingParams(), kv_budget_tokens=400_000).run(reqs, plan)
            for c in batch]
    return [c.token_ids for c in sorted(done, key=lambda c: c.key)], compiled


def replay(seqs: list[list[int]], compiled, threads: int) -> tuple[float, float]:
    """(Seconds taking the tokens, seconds computing the masks) over the lockstep replay; ``threads`` 0: one by
    one on this thread."""
    from llguidance import LLExecutor

    pool = LLExecutor(threads) if threads else None
    compiled.renew()  # (the matchers made anew, as for a new job)
    ms = [compiled.matcher(own=True) for _ in seqs]
    words = (compiled.tokenizer.vocab_size + 31) // 32
    out = np.zeros((len(seqs), words), dtype=np.int32)
    take = mask = 0.0
    for k in range(max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if k < len(s) and not ms[i].is_stopped()]
        if not live:
            break
        pairs = [(ms[i], seqs[i][k]) for i in live]
        t = time.perf_counter()
        if pool is None:
            for m, tok in pairs:
                m.consume_token(tok)
        else:
            pool.consume_token_par(pairs)
        take += time.perf_counter() - t
        t = time.perf_counter()
        if pool is None:
            for i in live:
                ms[i].compute_bitmask()
        else:
            pool.unsafe_compute_mask_ptr([(ms[i], j) for j, i in enumerate(live)], out.ctypes.data, words * 4,
                                         len(out))
        mask += time.perf_counter() - t
    return take, mask


def main() -> None:
    from batchrun.engine.constraints import matcher_group

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="examples/extract.yaml")
    ap.add_argument("--copies", type=int, default=4, help="rows per output replayed")
    ap.add_argument("--threads", default="1,2", help="pool sizes (besides one by one)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    seqs, compiled = outputs(a.job)
    seqs = seqs * a.copies
    group = matcher_group()
    row = {"bench": "take-in-run", "job": a.job, "rows": len(seqs), "cpus": len(os.sched_getaffinity(0)),
           "matcher_group": "all" if group is None else group}
    for threads in [0, *(int(x) for x in a.threads.split(","))]:
        take, mask = replay(seqs, compiled, threads)
        row[f"par{threads}" if threads else "seq"] = {"take_s": round(take, 4), "mask_s": round(mask, 4)}
    row |= {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, a.out)


if __name__ == "__main__":
    main()
