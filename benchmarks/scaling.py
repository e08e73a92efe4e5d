"""Data-parallel scaling through the product: ``batchrun submit`` of one workload on 1, 2, 4, 8 GPUs.

    python benchmarks/scaling.py --model 8b --workloads fewshot,templates --scale 1 --seed 5 --gpus 1,2,4,8

For each workload (../shared/BENCHMARKS.md; the same rows for every GPU count) and each GPU count that this
machine has, a fresh ``batchrun submit --fresh --json`` process runs the job on random weights of the model
size (``model.load: random``; no weights file is read): one GPU is ``engine.device: cuda:0`` (the engine in
the batchrun process, as a one-GPU user runs it), N GPUs are ``engine.devices: [cuda:0, ..., cuda:N-1]`` (one
worker process each). One JSON line per run is appended to benchmarks/results/scaling-h200.jsonl: GPUs, wall
time (``total_s``: reading, tokenizing, planning, loading, generating, writing), tokens per second, the
speed-up over one GPU in the same invocation, each worker's busy fraction of the generation time and idle
share of the wall time, the shard balance and the prefill that sharding repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads
from results_io import git_commit, record

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "scaling-h200.jsonl"

JOB = """name: scaling-{workload}
model: {{load: random, size: {model}, tokenizer: "{tokenizer}", dtype: bfloat16}}
input: {{path: "{data}"}}
prompt: {{template: "{{{{ text }}}}", chat: false}}
sampling: {{max_tokens: max_tokens, ignore_eos: true}}
output: {{path: "{out}", part_rows: 100000}}
engine: {engine}
"""


def visible_gpus() -> tuple[int, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.CalledProcessError):
        return 0, "none"
    return len(out), out[0] if out else "none"


def run(job: Path) -> tuple[dict, dict, float]:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "batchrun", "submit", str(job), "--fresh", "--json"], cwd=REPO,
                       capture_output=True, text=True)
    wall = time.monotonic() - t
    if p.returncode != 0:
        raise SystemExit(f"submit failed ({p.returncode}):\n{p.stderr[-4000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    manifest = json.loads((Path(summary["output"]) / "_manifest.json").read_text())
    return summary, manifest, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="8b")
    ap.add_argument("--workloads", default="fewshot,templates")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--tokenizer", default=str(REPO / ".tok"), help="tokenizer directory (SmolLM2's)")
    ap.add_argument("--workdir", default="/tmp/batchrun-scaling")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--baseline", type=float, default=None,
                    help="one GPU's wall time measured before (when --gpus leaves out 1): the speed-up is over it")
    args = ap.parse_args()
    have, gpu = visible_gpus()
    counts = [n for n in (int(x) for x in args.gpus.split(",")) if n <= have]
    if not counts:
        raise SystemExit(f"no GPU count of {args.gpus} fits the {have} GPU(s) here")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.workloads.split(","):
        w = workloads.make(name, scale=args.scale, seed=args.seed)
        data = work / f"{name}-{args.scale}-{args.seed}.parquet"
        pq.write_table(pa.table({"text": w.texts(), "max_tokens": w.max_tokens}), data)
        base = args.baseline
        for n in counts:
            devices = ", ".join(f"cuda:{i}" for i in range(n))
            engine = "{device: cuda:0}" if n == 1 else f"{{devices: [{devices}]}}"
            job = work / f"{name}-{n}.yaml"
            job.write_text(JOB.format(workload=name, model=args.model, tokenizer=args.tokenizer, data=data,
                                      out=work / f"out-{name}-{n}", engine=engine))
            summary, manifest, wall = run(job)
            t = summary["timings"]
            tokens = summary["prompt_tokens"] + summary["output_tokens"]
            total = t["total_s"]
            ws = (manifest.get("workers") or {})
            per = ws.get("workers") or []
            row = {"bench": "scaling", "model": args.model, "workload": name, "scale": args.scale,
                   "seed": args.seed, "system": "batchrun_submit", "gpus": n, "rows": summary["rows_total"],
                   "prompt_tokens": summary["prompt_tokens"], "output_tokens": summary["output_tokens"],
                   "wall_s": round(total, 3), "process_s": round(wall, 3), "generate_s": t["generate_s"],
                   "load_s": t["load_s"], "tokens_per_s": round(tokens / total),
                   "output_tokens_per_s": round(summary["output_tokens"] / total),
                   "speedup": round(base / total, 3) if base else (1.0 if n == 1 else None),
                   "efficiency": round(base / total / n, 3) if base else None,
                   "busy_fraction": [round(r["busy_s"] / t["generate_s"], 3) for r in per] or None,
                   "idle_share": [round(1 - r["busy_s"] / total, 3) for r in per] or None,
                   "ready_s": [r.get("ready_s") for r in per] or None,
                   "reruns": ws.get("reruns"), "lost": [r["lost"] for r in per if r.get("lost")] or None,
                   "shards": ws.get("shards"), "balance": ws.get("balance"),
                   "duplicated_prefill_tokens": ws.get("duplicated_prefill_tokens"),
                   "roofline_fraction": None, "gpu": gpu, "commit": git_commit(),
                   "date": time.strftime("%Y-%m-%d")}
            if n == 1:
                base = total
            record(row, args.out)


if __name__ == "__main__":
    main()
