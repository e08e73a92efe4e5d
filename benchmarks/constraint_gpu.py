"""GPU: the cost of JSON-schema token masks at a large batch (random-weight 1b model, BENCHMARKS.md fewshot
rows), batchrun's engine with and without the constraint in one process.

    python benchmarks/constraint_gpu.py --rows 512 --tokenizer .tok --out benchmarks/results/constraint-h200.jsonl

Reports each run's wall time and steps, the CPU time of grammar work (``mask_s``: masks and forced tokens)
as a share of the constrained run's wall time, and what it adds to the steps (``mask_added_share``: time
waiting for the masks, computed with the forced tokens in a worker thread while the GPU runs the step; the
issue's target: at most 10%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from gpu_bench import random_model
from results_io import git_commit, record

from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import compile_constraint
from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Request, SamplingParams
from batchrun.plan.plan import PlanConfig, build_plan

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment", "complaints"],
          "properties": {"product": {"type": "string", "maxLength": 24},
                         "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "complaints": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 24}}}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: check the script runs")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = random_model("tiny" if args.tiny else "1b", device)
    loaded = LoadedModel(model, tok, device, "bfloat16", "random", "random", [tok.eos_token_id], 8192)
    w = workloads.make("fewshot", rows=args.rows, seed=1)
    compiled = compile_constraint("json_schema", SCHEMA, tok)
    plan = build_plan(w.tokens, np.full(args.rows, args.max_tokens), PlanConfig())
    row = {"bench": "constraint-gpu", "model": "tiny" if args.tiny else "1b", "rows": args.rows,
           "max_tokens": args.max_tokens}
    for name in ("warmup", "free", "constrained"):
        reqs = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=args.max_tokens,
                        constraint=compiled.new() if name != "free" else None) for i in range(args.rows)]
        engine = BatchEngine(loaded, SamplingParams(), kv_budget_tokens=400_000)
        before = dict(compiled.stats)
        sync()
        t = time.perf_counter()
        out = [c for batch in engine.run(reqs, plan) for c in batch]
        sync()
        wall = time.perf_counter() - t
        if name == "warmup":
            continue
        row[name] = {"wall_s": round(wall, 3), "steps": engine.stats["steps"],
                     "output_tokens": sum(len(c.token_ids) for c in out),
                     "masks": compiled.stats["masks"] - before["masks"],
                     "mask_s": round(compiled.stats["mask_s"] - before["mask_s"], 3),
                     "mask_wait_s": round(engine.stats["mask_wait_s"], 3)}
    c = row["constrained"]
    row["mask_cpu_share_of_wall"] = round(c["mask_s"] / c["wall_s"], 4)
    # What grammar work adds to the steps: waiting for the masks (computed, with the forced tokens, in a
    # worker thread while the GPU runs the step).
    row["mask_added_share"] = round(c["mask_wait_s"] / c["wall_s"], 4)
    row["mask_ms_each"] = round(1000 * c["mask_s"] / max(c["masks"], 1), 4)
    row |= {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, args.out)


if __name__ == "__main__":
    main()
