"""BatchPrompt's inline layout against single-item prompts on SmolLM2-135M-Instruct (CPU, fp32), on the labeled
set of examples/make_labeled.py: accuracy, prompts, prompt tokens, computed tokens (after prefix sharing, plus
outputs) and wall time per setting.

    python benchmarks/batchprompt_eval.py --out benchmarks/results/batchprompt-cpu.jsonl

Settings: single item (K = 1, one round), then K in 4, 8, 16 with R in 1, 3, 5, SEAS on/off and position
calibration on/off (R = 1 runs without SEAS: it needs two rounds). Every setting uses the same model and
engine; rows are the whole labeled set.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

from batchrun.engine.batch import BatchEngine
from batchrun.engine.loader import load
from batchrun.engine.requests import SamplingParams
from batchrun.plan.batchprompt import BatchPromptConfig
from batchrun.runtime.batchprompt import BatchPrompter, Layout, Prompter
from batchrun.spec import EngineSpec, ModelSpec

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "labeled_sentiment.parquet"
LAYOUT = Layout("Read each product review and say whether its sentiment is positive or negative.")


def settings(quick: bool):
    yield "single", BatchPromptConfig(items_per_prompt=1, rounds=1, seas=False, calibrate=False)
    ks, rs = ((4, 8), (1, 3)) if quick else ((4, 8, 16), (1, 3, 5))
    for k, r, seas, cal in itertools.product(ks, rs, (False, True), (False, True)):
        if r == 1 and seas:
            continue
        yield f"K{k}-R{r}-{'seas' if seas else 'all'}-{'cal' if cal else 'raw'}", \
            BatchPromptConfig(items_per_prompt=k, rounds=r, seas=seas, calibrate=cal, seed=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer settings (K 4, 8; R 1, 3)")
    args = ap.parse_args()
    table = pq.read_table(DATA)
    texts, gold = table["text"].to_pylist(), table["label"].to_pylist()
    if args.rows:
        texts, gold = texts[: args.rows], gold[: args.rows]
    loaded = load(ModelSpec(path="smollm2-135m-instruct", dtype="float32"), EngineSpec(device="cpu"))
    engine = BatchEngine(loaded, SamplingParams(), kv_budget_tokens=400_000, block_size=16, step_tokens=2048)
    for name, cfg in settings(args.quick):
        bp = BatchPrompter(engine, Prompter(loaded.tokenizer, LAYOUT, texts))
        t = time.perf_counter()
        out = bp.classify(cfg)
        wall = time.perf_counter() - t
        right = sum(out.results[i].label == gold[i] for i in range(len(texts)))
        u = bp.usage
        record({"bench": "batchprompt", "setting": name, "items_per_prompt": cfg.items_per_prompt,
                "rounds": cfg.rounds, "seas": cfg.seas, "calibrate": cfg.calibrate, "items": len(texts),
                "accuracy": round(right / len(texts), 4), "prompts": u.prompts, "prompts_per_round": out.prompts,
                "fallback_prompts": out.fallback_prompts, "prompt_tokens": u.prompt_tokens,
                "computed_tokens": u.computed_tokens, "output_tokens": u.output_tokens, "wall_s": round(wall, 2),
                "model": "SmolLM2-135M-Instruct fp32 cpu", "commit": git_commit(),
                "date": time.strftime("%Y-%m-%d")}, args.out)


if __name__ == "__main__":
    main()
