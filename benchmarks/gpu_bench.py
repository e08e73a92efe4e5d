"""GPU benchmark: batchrun's engine vs hf_padded on ../shared/BENCHMARKS.md workloads, random-weight Llama models.

    python benchmarks/gpu_bench.py --model 1b --workload fewshot --scale 0.25 --out results.jsonl

Systems, same model and rows, in one process: ``hf_padded`` (transformers generate, batches of 64 in input
order, left padding, greedy, each row stopped at its own max_tokens: the reference engine without a plan)
and ``batchrun`` (the plan + batchrun's engine). EOS is ignored: every row generates exactly max_tokens.
Roofline time = max(2 N (unique prompt + output tokens) / peak FLOP/s, longest max_tokens * weight bytes /
HBM bandwidth), both peaks measured in the same run.
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
from results_io import git_commit, record

from batchrun.engine import attention
from batchrun.engine.batch import BatchEngine
from batchrun.engine.factory import kv_budget
from batchrun.engine.loader import LoadedModel, loaded_facts
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import EngineSpec

MODELS = {"1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192),
          "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336)}


class _Ids:
    """Benchmarks need no text: a tokenizer stand-in."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def random_model(name: str, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=False, **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval()


def peaks() -> tuple[float, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    flops = 10 * 2 * 8192**3 / (time.perf_counter() - t)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    hbm = 10 * 2 * x.numel() / (time.perf_counter() - t)
    return flops, hbm


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_system(system: str, loaded: LoadedModel, requests: list[Request], plan) -> tuple[float, dict]:
    params = SamplingParams(ignore_eos=True)
    if system == "hf_padded":
        engine = ReferenceEngine(loaded, params, batch_size=64)
        it = engine.run(requests)
    else:
        cfg = EngineSpec(block_size=plan.config.block_size, step_tokens=plan.config.step_tokens)
        budget = kv_budget(cfg, loaded_facts(loaded), requests)  # the job's rule: weights loaded, 90% of free
        engine = BatchEngine(loaded, params, kv_budget_tokens=budget, block_size=cfg.block_size,
                             step_tokens=cfg.step_tokens)
        # Warm-up outside the timer: Triton compiles the attention kernel once per process (a few seconds).
        few = requests[:16]
        sum(len(b) for b in engine.run(few, build_plan(plan.tokens.take(np.arange(len(few))),
                                                       plan.max_tokens[: len(few)], plan.config)))
        it = engine.run(requests, plan)
    _sync()
    t = time.perf_counter()
    n = sum(len(batch) for batch in it)
    _sync()
    assert n == len(requests)
    wall = time.perf_counter() - t
    if system == "hf_padded":
        return wall, {}
    return wall, {"steps": engine.stats["steps"], "graph_steps": engine.runner.graph_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--workload", default="fewshot", choices=workloads.NAMES)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--systems", default="hf_padded,batchrun")
    ap.add_argument("--step-tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=None, help="override the row count (a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: check the script runs")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        MODELS["tiny"] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128)
        args.model, flops, hbm = "tiny", 1e11, 1e10
    else:
        flops, hbm = peaks()
    model = random_model(args.model, device)
    loaded = LoadedModel(model, _Ids(), device, "bfloat16", f"random:{args.model}", f"random:{args.model}", [], 8192)
    w = workloads.make(args.workload, scale=args.scale, rows=args.rows)
    requests = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
                for i in range(len(w.tokens))]
    t = time.perf_counter()
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig(step_tokens=args.step_tokens))
    plan_s = time.perf_counter() - t
    n_params = sum(p.numel() for name, p in model.named_parameters()
                   if "embed_tokens" not in name and "lm_head" not in name)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    unique, output = plan.trie.unique_tokens, int(w.max_tokens.sum())
    roofline = max(2 * n_params * (unique + output) / flops, int(w.max_tokens.max()) * weight_bytes / hbm)
    commit = git_commit()
    for system in args.systems.split(","):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall, extra = run_system(system, loaded, requests, plan)
        row = {"bench": "gpu", "model": args.model, "workload": args.workload, "scale": args.scale, "system": system,
               "rows": len(requests), "prompt_tokens": w.tokens.num_tokens, "unique_tokens": unique,
               "output_tokens": output, "wall_s": round(wall, 3),
               "tokens_per_s": round((w.tokens.num_tokens + output) / wall),
               "output_tokens_per_s": round(output / wall),
               "peak_gpu_mem_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda"
                                   else None),
               "roofline_s": round(roofline, 4), "roofline_fraction": round(roofline / wall, 4),
               "peak_tflops": round(flops / 1e12, 1), "hbm_tb_s": round(hbm / 1e12, 2), "plan_s": round(plan_s, 3),
               "attention": attention.choose_backend(device, torch.bfloat16).name if system == "batchrun" else None,
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "commit": commit,
               "date": time.strftime("%Y-%m-%d"), **extra}
        record(row, args.out)


if __name__ == "__main__":
    main()
