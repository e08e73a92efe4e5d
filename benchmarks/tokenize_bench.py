"""CPU: the prompts stage's tokenizing (``batchrun.io.prompts.tokenize``), through transformers' tokenizer call,
straight through the fast tokenizer's Rust encoder text by text (``rust_encoder``), and as ``tokenize`` does
it now (``shared``: the Rust encoder, each shared beginning once, ``batchrun.io.shared_tokens``).

    python benchmarks/tokenize_bench.py --workload fewshot --scale 0.25 --seed 4 \
        --out benchmarks/results/tokenize-cpu.jsonl

The workload's text (``../shared/BENCHMARKS.md``), the SmolLM2 tokenizer (``--tokenizer``, default ``.tok/``:
``scripts/device_files.sh`` writes it), best of ``--repeat`` runs each, alternating. Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

from batchrun.io import prompts


def _transformers_call(tokenizer, add_special_tokens: bool):
    return lambda texts: tokenizer(texts, add_special_tokens=add_special_tokens,
                                   return_attention_mask=False)["input_ids"]


def _rust_whole(tokenizer, add_special_tokens: bool):
    backend = tokenizer.backend_tokenizer
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="fewshot", choices=workloads.NAMES)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = list(workloads.make(args.workload, scale=args.scale, seed=args.seed).texts())
    current = prompts._encoder
    encoders = {"transformers": _transformers_call, "rust_encoder": _rust_whole, "shared": current}
    best = dict.fromkeys(encoders, float("inf"))
    tables = {}
    for _ in range(args.repeat):
        for name, encoder in encoders.items():
            prompts._encoder = encoder
            try:
                t = time.perf_counter()
                tables[name] = prompts.tokenize(tok, list(texts))
                best[name] = min(best[name], time.perf_counter() - t)
            finally:
                prompts._encoder = current
    a = tables["transformers"]
    same = all(np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets) for b in tables.values())
    record({"bench": "tokenize", "workload": args.workload, "scale": args.scale, "seed": args.seed,
            "rows": len(texts), "tokens": tables["rust_encoder"].num_tokens,
            **{f"{k}_s": round(v, 3) for k, v in best.items()}, "same_ids": bool(same), "cpus": os.cpu_count(),
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}, args.out)


if __name__ == "__main__":
    main()
