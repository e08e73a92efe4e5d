"""The host work of batchrun's mask pipeline at a batch of 960 rows, with no model: each row writes a JSON
object of the extraction example's schema (its own product text and complaints), its tokens drawn as a greedy
model that keeps to that text would draw them, and the pipeline runs as the engine runs it step by step
(``MaskPipeline.start``/``launch``, ``Masks.wait``/``settle``, forced runs appended). It reports the
launching thread's seconds per step in each part, split into llguidance's own calls (``take_s``,
``mask_pool_s``) and the rest (Python: the glue that ``step_glue_ms`` sums), and the launching thread's CPU
time (``main_cpu_s``: with ``BATCHRUN_MASK_WORKER=1`` the worker's share is not in it), so that the glue can be cut
where it is, on any machine (the GPU machine's steps are host-bound: the glue adds to them directly).

    python benchmarks/mask_glue.py --tokenizer .tok [--cprofile out.prof] [--out benchmarks/results/mask-glue.jsonl]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment", "complaints"],
          "properties": {"product": {"type": "string"}, "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "complaints": {"type": "array", "items": {"type": "string"}}}}
PRODUCTS = ["phone case", "coffee grinder", "desk lamp", "electric kettle", "wireless mouse", "yoga mat",
            "rice cooker", "hiking backpack", "bluetooth speaker", "office chair", "water bottle", "air fryer"]
COMPLAINTS = ["battery drains quickly", "too loud", "lid is hard to open", "short cord", "poor stitching",
              "arrived late", "flimsy buttons", "hard to clean", "smells of plastic", "app keeps crashing"]


def targets(rows: int) -> list[str]:
    """Each row's JSON text (one line, as the schema's style writes it)."""
    out = []
    for i in range(rows):
        rng = np.random.default_rng(i)
        product = f"{PRODUCTS[i % len(PRODUCTS)]} model {i}"
        complaints = ", ".join(f'"{COMPLAINTS[j]}"' for j in rng.choice(len(COMPLAINTS), i % 3, replace=False))
        sentiment = ("positive", "negative", "mixed")[i % 3]
        out.append(f'{{"product": "{product}", "sentiment": "{sentiment}", "complaints": [{complaints}]}}')
    return out


def main() -> None:
    from transformers import AutoTokenizer

    from batchrun.engine import constraints, grammar_pool, masks
    from batchrun.engine.constraints import compile_constraint

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--rows", type=int, default=960)
    ap.add_argument("--repeat", type=int, default=3, help="runs (the fastest is reported)")
    ap.add_argument("--cprofile", default=None, help="write a cProfile of the last run here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    compiled = compile_constraint("json_schema", SCHEMA, tok)
    texts = targets(args.rows)
    vocab = len(tok)
    eos = tok.eos_token_id
    # The token a greedy model keeping to the text draws next: the first token of the rest's own tokenization.
    decode = {}

    def text_of(ids: list[int]) -> str:
        key = tuple(ids)
        if key not in decode:
            decode[key] = tok.decode(ids)
        return decode[key]

    best = None
    for run in range(args.repeat):
        grammars = [compiled.new() for _ in range(args.rows)]
        generated: list[list[int]] = [[] for _ in range(args.rows)]
        live = list(range(args.rows))
        pipe = masks.MaskPipeline(vocab, False, True)
        logits = torch.zeros(args.rows, vocab)
        parts = {"launch": 0.0, "wait": 0.0, "settle": 0.0, "forced": 0.0, "start": 0.0}
        before = dict(compiled.stats)
        prof = None
        if args.cprofile and run == args.repeat - 1:
            import cProfile

            prof = cProfile.Profile()
        steps = 0
        main_cpu = 0.0
        while live:
            draws = []
            for i in live:
                rest = texts[i][len(text_of(generated[i])):]
                draws.append(tok.encode(rest, add_special_tokens=False)[0] if rest else eos)
            step_logits = logits[: len(live)]
            step_logits.zero_()
            step_logits[torch.arange(len(live)), torch.tensor(draws)] = 1.0
            if prof is not None:
                prof.enable()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            m = pipe.launch(live, [grammars[i] for i in live], [generated[i] for i in live])
            t1 = time.perf_counter()
            packed, rows, forced, _ = m.wait()
            t2 = time.perf_counter()
            at = np.arange(len(live)) if rows is None else rows.numpy()  # (each row's mask)
            allowed = ((packed.numpy()[at, np.asarray(draws) >> 5] >> (np.asarray(draws) & 31)) & 1)
            tokens = [d if ok else eos for d, ok in zip(draws, allowed.tolist())]
            m.settle(tokens, step_logits)
            t3 = time.perf_counter()
            if forced is not None:
                forced.result()
            going = []
            for i, t in zip(live, tokens):
                generated[i].append(t)
                if t == eos or len(generated[i]) >= 80:
                    continue
                ff = grammars[i].forced_after(generated[i])
                generated[i] += ff
                going.append(i)
            t4 = time.perf_counter()
            if going:
                pipe.start(going, [grammars[i] for i in going], [generated[i] for i in going])
            t5 = time.perf_counter()
            main_cpu += time.thread_time() - c0
            if prof is not None:
                prof.disable()
            for k, s in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[k] += s
            live = going
            steps += 1
        stats = {k: compiled.stats.get(k, 0) - before.get(k, 0) for k in ("take_s", "mask_pool_s", "masks",
                                                                          "take_rounds")}
        total = sum(parts.values())
        glue = total - stats["take_s"] - stats["mask_pool_s"]
        row = {"steps": steps, "total_s": round(total, 4), "glue_s": round(glue, 4),
               "step_glue_ms": round(1000 * glue / steps, 3), "main_cpu_s": round(main_cpu, 4),
               "parts_s": {k: round(v, 4) for k, v in parts.items()},
               "take_s": round(stats["take_s"], 4), "take_rounds": round(stats["take_rounds"]),
               "mask_pool_s": round(stats["mask_pool_s"], 4),
               "masks": stats["masks"], "valid": sum(not g.incomplete(generated[i][:-1] if generated[i][-1] == eos
                                                                        else generated[i])
                                                     for i, g in enumerate(grammars))}
        if best is None or row["total_s"] < best["total_s"]:
            best = row
        if prof is not None:
            prof.dump_stats(args.cprofile)
    out = {"bench": "mask-glue", "rows": args.rows, "cpus": len(os.sched_getaffinity(0)),
           "mask_worker": os.environ.get("BATCHRUN_MASK_WORKER", "1") == "1",
           "matcher_group": "all" if constraints.matcher_group() is None else constraints.matcher_group(),
           "grammar_threads": os.environ.get("BATCHRUN_GRAMMAR_THREADS", "default"),
           "lazy_masks": os.environ.get("BATCHRUN_LAZY_MASKS", "auto"), **best,
           "shared_history": grammar_pool.SHARED_HISTORY, "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(out, args.out)


if __name__ == "__main__":
    main()
