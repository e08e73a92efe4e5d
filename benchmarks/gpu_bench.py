"""GPU benchmark suite: batchrun vs hf_padded on ../shared/BENCHMARKS.md workloads, random-weight Llama models.

    python benchmarks/gpu_bench.py --models 1b,8b --workloads all --seed 1 --profile \
        --out benchmarks/results/suite-h200.jsonl

One command, one process: for each model and workload (at ``--scale``, or by default the scales of the
engine issue's table: fewshot and rag 0.25, templates 0.0625, noshare 0.125), each system runs the same rows:
``hf_padded`` (transformers generate, batches of 64 in input order, left padding, greedy, each row stopped at
its own max_tokens: the reference engine without a plan), ``batchrun`` (the plan + batchrun's engine), and
``submit`` (``batchrun submit`` end to end — reading Parquet, tokenizing, planning, loading the model from a
directory of safetensors (``--submit-model dir``) or building it from the spec (``random``), writing results
— on the workload's text; its row carries load and total times). EOS is ignored: every row generates exactly
max_tokens. Roofline time = max(2 N (unique prompt + output tokens) / peak FLOP/s, longest max_tokens *
weight bytes / HBM bandwidth), both peaks measured in the same run. ``--profile`` adds a profiled batchrun
run: the fraction of time the GPU was busy and the host launches per engine step. Each system's row also has
the garbage collector's pauses in its timed run (``gc_s``; ``gc_full_s`` and ``gc_full``: full collections).
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
import workloads
from gpu_trace import summarize
from results_io import git_commit, record
from step_timing import gc_pauses

from batchrun.engine import attention
from batchrun.engine.batch import BatchEngine
from batchrun.engine.factory import kv_budget
from batchrun.engine.loader import LoadedModel, loaded_facts
from batchrun.engine.random_weights import SIZES, build
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import EngineSpec

MODELS = SIZES  # (batchrun.engine.random_weights: 1b, 8b, tiny)
SCALES = {"fewshot": 0.25, "rag": 0.25, "templates": 0.0625, "noshare": 0.125}  # the engine issue's table
SYSTEMS = {  # batchrun's engine under settings read as it is made (the variants to compare with the default)
    "batchrun": {},
    "batchrun_unfused": {"BATCHRUN_FUSED": "0"},  # transformers' own norms, MLPs and rotary
    "batchrun_nobuckets": {"BATCHRUN_STEP_BUCKETS": "0"},  # eager steps unpadded (one shape per step)
    "batchrun_capture2": {"BATCHRUN_CAPTURE_AFTER": "2"},  # a decode shape captured on its third use
    # the engine's settings before 2026-12-01 (the paged kernel's code is today's)
    "batchrun_previous": {"BATCHRUN_STEP_BUCKETS": "0", "BATCHRUN_CAPTURE_AFTER": "2",
                          "BATCHRUN_PAGED_WIDE_CAUSAL": "0"},
    "batchrun_narrowcausal": {"BATCHRUN_PAGED_WIDE_CAUSAL": "0"},  # sequences' own rows all in narrow tiles
}


class _Ids:
    """Benchmarks need no text: a tokenizer stand-in."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def random_model(name: str, device: str = "cuda"):
    """The benchmark model ``name``: BENCHMARKS.md's architecture, vocabulary 49152, weights N(0, 0.02) in bf16
    (the same builder as ``model.load: random``, seed 0)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=False, **SIZES[name])
    return build(cfg, device, torch.bfloat16, seed=0)


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


def warmed_engine(loaded: LoadedModel, requests: list[Request], plan,
                  settings: dict[str, str] | None = None) -> tuple[BatchEngine, int]:
    """batchrun's engine for ``requests`` under ``settings`` (environment variables read as it is made, put
    back afterwards), with the job's KV budget, warmed up on 16 of the rows; and that budget (tokens)."""
    cfg = EngineSpec(block_size=plan.config.block_size, step_tokens=plan.config.step_tokens)
    budget = kv_budget(cfg, loaded_facts(loaded), requests)  # the job's rule: weights loaded, 90% of free
    settings = settings or {}
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        engine = BatchEngine(loaded, SamplingParams(ignore_eos=True), kv_budget_tokens=budget,
                             block_size=cfg.block_size, step_tokens=cfg.step_tokens)
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    # Warm-up outside the timer: Triton compiles the attention kernels once per process (a few seconds).
    few = requests[:16]
    sum(len(b) for b in engine.run(few, build_plan(plan.tokens.take(np.arange(len(few))),
                                                   plan.max_tokens[: len(few)], plan.config)))
    return engine, budget


def run_system(system: str, loaded: LoadedModel, requests: list[Request], plan, profile: bool) -> tuple[float, dict]:
    params = SamplingParams(ignore_eos=True)
    if system == "hf_padded":
        engine = ReferenceEngine(loaded, params, batch_size=64)
        run = lambda: engine.run(requests)
    else:
        engine, budget = warmed_engine(loaded, requests, plan, {"BATCHRUN_FUSED": "1", **SYSTEMS[system]})
        run = lambda: engine.run(requests, plan)
    _sync()
    graphs0 = getattr(getattr(engine, "runner", None), "graph_steps", 0)
    with gc_pauses() as pauses:  # (the garbage collector's pauses in the timed run)
        t = time.perf_counter()
        n = sum(len(batch) for batch in run())
        _sync()
        wall = time.perf_counter() - t
    assert n == len(requests)
    if system == "hf_padded":
        return wall, dict(pauses)
    extra = {"steps": engine.stats["steps"], "graph_steps": engine.runner.graph_steps - graphs0,
             "kv_budget_tokens": budget, **pauses}
    if torch.cuda.is_available():  # (the device's memory, against which peak_gpu_mem_gb is read)
        extra["gpu_total_gb"] = round(torch.cuda.mem_get_info()[1] / 1e9, 2)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        # An unprofiled run first (warm, as the profiled one is): the profiler slows the host, and a host-bound
        # run then reads as less busy than it is; its kernels' time over this run's wall is the busy fraction
        # of generation without that overhead (gpu_busy_unprofiled).
        t = time.perf_counter()
        sum(len(batch) for batch in run())
        _sync()
        again = time.perf_counter() - t
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            sum(len(batch) for batch in run())
            _sync()
            profiled = time.perf_counter() - t
        trace = summarize(prof, profiled)
        kernel_s = trace["busy"] * profiled  # (the union of the kernels' intervals)
        extra |= {"gpu_busy": round(trace["busy"], 3), "profiled_wall_s": round(profiled, 3),
                  "again_wall_s": round(again, 3), "gpu_kernel_s": round(kernel_s, 3),
                  "gpu_busy_unprofiled": round(min(kernel_s / again, 1.0), 3),
                  "launches_per_step": round(trace["launches"] / extra["steps"], 1)}
    return wall, extra


def run_submit(name: str, w, scale: float, seed: int, mode: str, tokenizer: str, workdir: Path,
               devices: list[str] | None = None) -> tuple[float, dict]:
    """``batchrun submit`` end to end on the workload's text (a fresh output directory each time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchrun.runtime.job import run_job
    from batchrun.spec import JobSpec

    data = workdir / f"{w.name}-{scale}-{seed}.parquet"
    if not data.exists():
        pq.write_table(pa.table({"text": w.texts(), "max_tokens": w.max_tokens.astype(np.int64)}), data)
    if mode == "dir":
        model_dir = workdir / f"model-{name}"
        if not (model_dir / "config.json").exists():
            from transformers import AutoTokenizer

            random_model(name, "cuda").save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(model_dir)
            torch.cuda.empty_cache()
        model = {"path": str(model_dir), "dtype": "bfloat16"}
    else:
        model = {"load": "random", "size": name, "tokenizer": tokenizer, "dtype": "bfloat16"}
    spec = JobSpec.model_validate({
        "name": f"bench-{w.name}", "model": model, "input": {"path": str(data)},
        "prompt": {"template": "{{ text }}", "chat": False},
        "sampling": {"max_tokens": "max_tokens", "ignore_eos": True},
        "output": {"path": str(workdir / f"out-{w.name}")},
        "engine": {"devices": devices} if devices else {"device": "cuda"}})
    torch.cuda.synchronize()
    result = run_job(spec, fresh=True)
    extra = {"devices": devices, "workers": result.workers} if devices else {}
    return result.timings["total_s"], {"submit_model": mode, "rows_ok": result.rows_ok,
                                       "submit_prompt_tokens": result.prompt_tokens, **result.timings, **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1b", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--workloads", default="all", help="comma-separated, or all: " + ", ".join(workloads.NAMES))
    ap.add_argument("--scale", type=float, default=None, help="every workload at this scale (default: SCALES)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="hf_padded,batchrun",
                    help="comma-separated: hf_padded, submit, " + ", ".join(SYSTEMS) + " (batchrun's engine "
                         "with settings: see SYSTEMS)")
    ap.add_argument("--profile", action="store_true", help="also a profiled batchrun run: GPU busy, launches")
    ap.add_argument("--submit-model", default="dir", choices=["dir", "random"])
    ap.add_argument("--tokenizer", default=".tok", help="tokenizer directory for submit (SmolLM2's)")
    ap.add_argument("--submit-devices", default=None,
                    help="submit with engine.devices: comma-separated lists separated by ';', one run each "
                         "(cuda:0;cuda:0,cuda:0 = one worker, then two workers sharing GPU 0)")
    ap.add_argument("--workdir", default="/tmp/batchrun-bench")
    ap.add_argument("--step-tokens", type=int, default=8192)
    ap.add_argument("--order", default="longest", choices=["longest", "ratio"],
                    help="the plan's row order among siblings: the longest estimated output first (batchrun's "
                         "default), or BatchLLM's decode/prefill ratio alone (before 2026-12-01)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=None, help="override the row count (a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: check the script runs")
    args = ap.parse_args()
    unknown = set(args.systems.split(",")) - {"hf_padded", "submit", *SYSTEMS}
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))}")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cpu" if args.tiny else "cuda"
    models = ["tiny"] if args.tiny else args.models.split(",")
    names = workloads.NAMES if args.workloads == "all" else args.workloads.split(",")
    flops, hbm = (1e11, 1e10) if args.tiny else peaks()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    for name in models:
        model = random_model(name, device)
        loaded = LoadedModel(model, _Ids(), device, "bfloat16", f"random:{name}", f"random:{name}", [], 8192)
        n_params = sum(p.numel() for pname, p in model.named_parameters()
                       if "embed_tokens" not in pname and "lm_head" not in pname)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for wname in names:
            scale = args.scale or SCALES[wname]
            w = workloads.make(wname, scale=scale, rows=args.rows, seed=args.seed)
            requests = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
                        for i in range(len(w.tokens))]
            t = time.perf_counter()
            plan = build_plan(w.tokens, w.max_tokens, PlanConfig(step_tokens=args.step_tokens,
                                                                 longest_first=args.order == "longest"))
            plan_s = time.perf_counter() - t
            unique, output = plan.trie.unique_tokens, int(w.max_tokens.sum())
            roofline = max(2 * n_params * (unique + output) / flops, int(w.max_tokens.max()) * weight_bytes / hbm)
            for system in args.systems.split(","):
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                runs = [None] if system != "submit" or not args.submit_devices else [
                    d.split(",") for d in args.submit_devices.split(";")]
                for devices in runs:
                    if system == "submit":
                        wall, extra = run_submit(name, w, scale, args.seed, args.submit_model, args.tokenizer,
                                                 workdir, devices)
                    else:
                        wall, extra = run_system(system, loaded, requests, plan,
                                                 args.profile and system.startswith("batchrun"))
                    row = {"bench": "gpu", "model": name, "workload": wname, "scale": scale, "seed": args.seed,
                           "system": system, "gpus": 1 if device == "cuda" else 0, "rows": len(requests),
                           "prompt_tokens": w.tokens.num_tokens, "unique_tokens": unique, "output_tokens": output,
                           "wall_s": round(wall, 3), "tokens_per_s": round((w.tokens.num_tokens + output) / wall),
                           "output_tokens_per_s": round(output / wall),
                           "peak_gpu_mem_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                               if device == "cuda" else None),
                           "roofline_s": round(roofline, 4), "roofline_fraction": round(roofline / wall, 4),
                           "peak_tflops": round(flops / 1e12, 1), "hbm_tb_s": round(hbm / 1e12, 2),
                           "plan_s": round(plan_s, 3), "order": args.order,
                           "attention": (attention.choose_backend(device, torch.bfloat16).name
                                         if system != "hf_padded" else None),
                           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "commit": commit,
                           "date": time.strftime("%Y-%m-%d"), **extra}
                    record(row, args.out)
        del model, loaded
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
