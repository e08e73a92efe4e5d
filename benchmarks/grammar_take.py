"""What llguidance's grammar work costs per row at a batch of 960, by pool size: 960 matchers of the extraction
example's schema inside a JSON string each take one token (``LLExecutor.consume_token_par``, against one
thread's ``consume_token`` loop: ``seq``), and compute their masks (``unsafe_compute_mask_ptr``). Medians of 12
tokens and 5 mask rounds, in ms per batch. No model, no GPU: a tokenizer only.

    python benchmarks/grammar_take.py --tokenizer .tok --out benchmarks/results/grammar-take-h200.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment", "complaints"],
          "properties": {"product": {"type": "string"}, "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "complaints": {"type": "array", "maxItems": 3, "items": {"type": "string"}}}}
TEXT = " the phone case is really nice and it works very well for me and my family every day"


def main() -> None:
    import os

    from llguidance import LLExecutor, LLMatcher
    from transformers import AutoTokenizer

    from batchrun.engine.constraints import compile_constraint

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--rows", type=int, default=960)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    comp = compile_constraint("json_schema", SCHEMA, tok)
    start = tok.encode('{"product": "', add_special_tokens=False)
    words = tok.encode(TEXT, add_special_tokens=False)[:12]
    row = {"bench": "grammar-take", "rows": args.rows, "cpus": len(os.sched_getaffinity(0))}
    for threads in (0, 1, 2, 4, 8, 12):
        pool = LLExecutor(threads) if threads else None
        matchers = [LLMatcher(comp.tokenizer, comp.grammar, log_level=0) for _ in range(args.rows)]
        for m in matchers:
            m.consume_tokens(start)
        label = f"par{threads}" if threads else "seq"
        took = []
        for w in words:
            t = time.perf_counter()
            if pool is None:
                for m in matchers:
                    m.consume_token(w)
            else:
                pool.consume_token_par([(m, w) for m in matchers])
            took.append(time.perf_counter() - t)
        row[f"{label}_take_ms"] = round(1000 * float(np.median(took)), 3)
        if pool is not None:
            out = np.zeros((args.rows, (comp.tokenizer.vocab_size + 31) // 32), dtype=np.int32)
            pairs = [(m, i) for i, m in enumerate(matchers)]
            masks = []
            for _ in range(5):
                t = time.perf_counter()
                pool.unsafe_compute_mask_ptr(pairs, out.ctypes.data, out.shape[1] * 4, args.rows)
                masks.append(time.perf_counter() - t)
            row[f"{label}_mask_ms"] = round(1000 * float(np.median(masks)), 3)
    row |= {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, args.out)


if __name__ == "__main__":
    main()
