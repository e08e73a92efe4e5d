"""GPU microbenchmark: the paged attention backend's tile settings on a workload's real steps.

    python benchmarks/paged_tiles.py --model 1b --workload fewshot --scale 0.25 --seed 4 \
        --out benchmarks/results/paged-tiles-h200.jsonl

The paged attention kernel was 30% of 1b fewshot's GPU time on the H200 (``profile-h200.jsonl``). This runs
the workload's steps as the engine schedules them (the engine's own scheduler and KV manager; every row
producing all its ``max_tokens``), lays each step out with the paged backend and times one layer's attention
(random queries, keys and values in bf16; the model's head geometry) under each setting of the sweep:
keys per inner tile (``BLOCK_N``), rows of a narrow tile (``TILE_ROWS``) and of a wide tile (``WIDE_ROWS``),
sequences' own rows in wide tiles too (``WIDE_CAUSAL``), the key loop's pipelining stages and a wide tile's
warps. Each setting's outputs are checked against the first setting's (the default) on the same steps. A line
per setting: the attention time of one layer summed over all steps (times the layers: the model's attention
time), and the prefill and decode steps' parts (``--split``: also each part with only the narrow tiles
launched, and with only the wide ones, the K/V store and the merge included in both).
``--tiny`` runs small shapes on the CPU in Triton's interpreter: a check that the script runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (before triton is imported)

import torch

from batchrun.engine.attention.paged import PagedBackend
from batchrun.engine.kv import KVManager
from batchrun.engine.random_weights import SIZES
from batchrun.engine.requests import Request
from batchrun.engine.scheduler import Scheduler
from batchrun.plan.plan import PlanConfig, build_plan

KNOBS = ("BLOCK_N", "TILE_ROWS", "WIDE_ROWS", "WIDE_CAUSAL", "NUM_STAGES", "WIDE_WARPS")
DEFAULT = {k: getattr(PagedBackend, k) for k in KNOBS}


def steps_of(w, pool_tokens: int):
    """The workload's steps in the engine's order (overlapped: ``launched``, then ``resolve`` a step later),
    each yielded while its KV layout is current."""
    plan = build_plan(w.tokens, w.max_tokens, PlanConfig())
    reqs = [Request(key=i, prompt_ids=w.tokens.row(i).tolist(), max_tokens=int(w.max_tokens[i]))
            for i in range(len(w.max_tokens))]
    sched = Scheduler(plan, reqs, KVManager(plan.prefixes, pool_tokens // 16, 16), plan.config.step_tokens, [])
    inflight = None
    while True:
        step = None if sched.finished() else sched.next_step()
        if step is None and inflight is None:
            return
        launched = None
        if step is not None and step.seqs:
            yield step
            sched.launched(step)
            launched = step
        if inflight is not None:
            for e in sched.resolve(inflight, [0] * len(inflight.sample_keys)):
                if e.ended:
                    sched.finish(e.key)
        inflight = launched


def sweep(args) -> list[dict]:
    grid = [dict(zip(KNOBS, v)) for v in itertools.product(
        [int(x) for x in args.block_n.split(",")], [int(x) for x in args.tile_rows.split(",")],
        [int(x) for x in args.wide_rows.split(",")],
        [x == "1" for x in args.wide_causal.split(",")],
        [None if x == "default" else int(x) for x in args.stages.split(",")],
        [int(x) for x in args.wide_warps.split(",")])]
    first = dict(DEFAULT)
    return [first] + [g for g in grid if g != first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(SIZES))
    ap.add_argument("--workload", default="fewshot", choices=workloads.NAMES)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--rows", type=int, default=None, help="override the row count (a smoke test)")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--tile-rows", default="16", help="rows of a narrow tile (tokens x query heads per KV head)")
    ap.add_argument("--wide-rows", default="128,256")
    ap.add_argument("--wide-causal", default="0,1")
    ap.add_argument("--stages", default="default,2,4", help="pipelining stages of the key loop")
    ap.add_argument("--wide-warps", default="4,8")
    ap.add_argument("--reps", type=int, default=3, help="timed repeats of each step (best kept)")
    ap.add_argument("--split", action="store_true",
                    help="also time each step with only its narrow tiles, and with only its wide ones")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    geo = SIZES["tiny" if args.tiny else args.model]
    heads, kv_heads = geo["num_attention_heads"], geo["num_key_value_heads"]
    dim, layers = geo["hidden_size"] // heads, geo["num_hidden_layers"]
    w = workloads.make(args.workload, scale=args.scale, rows=args.rows, seed=args.seed)
    pool_tokens = 2_000_000 if not args.tiny else 200_000
    k_pool = torch.zeros(1, pool_tokens + 1, kv_heads, dim, dtype=dtype, device=device)
    v_pool = torch.zeros_like(k_pool)
    gen = torch.Generator(device=device).manual_seed(0)
    reference: dict[int, torch.Tensor] = {}
    for setting in sweep(args):
        for k, v in setting.items():
            setattr(PagedBackend, k, v)
        t0 = time.perf_counter()
        try:
            got = time_setting(PagedBackend(k_pool, v_pool, heads), steps_of(w, pool_tokens), gen, reference,
                               1 if args.tiny else args.reps, args.split)
        except Exception as e:  # (a setting Triton cannot compile, e.g. out of shared memory: the sweep goes on)
            got = {"error": f"{type(e).__name__}: {e}"[:300]}
        if "error" not in got:
            got = {"attention_s": round(layers * (got["prefill"] + got["decode"]), 4),
                   "prefill_s": round(layers * got["prefill"], 4), "decode_s": round(layers * got["decode"], 4),
                   **({f"{k}_s": round(layers * got[k], 4) for k in got if k.endswith("_only")} if args.split else {}),
                   "steps": got["steps"], "max_abs_diff_vs_default": got["worst"]}
        record({"bench": "paged-tiles", "model": args.model if not args.tiny else "tiny",
                "workload": args.workload, "scale": args.scale, "seed": args.seed, "rows": len(w.max_tokens),
                **{k.lower(): v for k, v in setting.items()}, **got, "sweep_s": round(time.perf_counter() - t0, 1),
                "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}, args.out)


def time_setting(backend: PagedBackend, steps, gen: torch.Generator, reference: dict[int, torch.Tensor],
                 reps: int, split: bool = False) -> dict:
    """One layer's attention time over ``steps`` (best of ``reps`` after a first, compiling run; one run on
    the CPU), by prefill and decode steps, and the largest difference from ``reference``'s outputs (filled
    by the first setting: its first 64 steps). ``split``: also each step's time with only its narrow tiles, and
    with only its wide ones (each with the K/V store and the merge)."""
    pool = backend.k_pool  # [layers, slots, kv_heads, head_dim]
    heads, kv_heads, dim, device, dtype = backend.heads, pool.shape[2], pool.shape[3], pool.device, pool.dtype
    spent = dict.fromkeys(["prefill", "decode"] + [f"{k}_{t}_only" for k in ("prefill", "decode")
                                                    for t in ("narrow", "wide")], 0.0)
    steps_run, worst = 0, 0.0
    for i, step in enumerate(steps):
        t = step.num_tokens
        gen.manual_seed(i)
        q = torch.randn(1, heads, t, dim, dtype=dtype, device=device, generator=gen)
        kv = torch.randn(2, 1, kv_heads, t, dim, dtype=dtype, device=device, generator=gen)
        backend.prepare(step)
        best, out = _best(backend, q, kv, reps)
        kind = "decode" if all(len(s.tokens) == 1 for s in step.seqs) else "prefill"
        spent[kind] += best
        if split:  # the same step with only its narrow tiles, then only its wide ones
            meta = backend.meta
            tiles = meta.tile_item, meta.wide_item
            meta.wide_item = tiles[1][:0]
            spent[kind + "_narrow_only"] += _best(backend, q, kv, reps)[0]
            meta.tile_item, meta.wide_item = tiles[0][:0], tiles[1]
            spent[kind + "_wide_only"] += _best(backend, q, kv, reps)[0]
            meta.tile_item = tiles[0]
        steps_run += 1
        if i in reference:
            worst = max(worst, (out.float() - reference[i]).abs().max().item())
        elif len(reference) < 64:
            reference[i] = out.float()
    return {**spent, "steps": steps_run, "worst": worst}

def _best(backend: PagedBackend, q: torch.Tensor, kv: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    """The step's attention (one layer) ``reps`` times after a first run: the best time and the output (on
    the CPU: one run)."""
    best, out = float("inf"), None
    for rep in range(reps + 1 if q.device.type == "cuda" else 1):
        if q.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = backend.forward(q, kv[0], kv[1], 0, None)
            b.record()
            b.synchronize()
            if rep:
                best = min(best, a.elapsed_time(b) / 1000)
        else:
            s = time.perf_counter()
            out = backend.forward(q, kv[0], kv[1], 0, None)
            best = time.perf_counter() - s
    return best, out


if __name__ == "__main__":
    main()
