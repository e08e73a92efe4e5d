"""CPU (or GPU): what a JSON-schema constraint buys and costs, on the structured-extraction example.

    python benchmarks/constraint_bench.py                  # appends to benchmarks/results/constraint-cpu.jsonl
    python benchmarks/constraint_bench.py --set engine.device=cuda --out benchmarks/results/constraint-h200.jsonl

``examples/extract.yaml`` (SmolLM2-135M-Instruct, 240 reviews) runs twice through batchrun's engine in one
process, with its JSON-schema constraint and without it (the same prompts, greedy): the rate of outputs that
are valid against the schema, the generation time of each, the steps, and the CPU time spent computing token
masks (the constraint's cost; on a GPU it overlaps the forward pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from batchrun.engine.factory import make_engine
from batchrun.engine.loader import load
from batchrun.runtime.prepare import prepare
from batchrun.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

ROOT = Path(__file__).resolve().parents[1]


def valid(text: str, schema: dict) -> bool:
    """Is ``text`` one JSON object valid against the example's schema (its keys, enum, types, and lengths where
    it bounds them)?"""
    try:
        v = json.loads(text)
    except ValueError:
        return False
    props = schema["properties"]
    if not isinstance(v, dict) or set(v) != set(schema["required"]):
        return False
    complaints, inf = v["complaints"], float("inf")
    return (isinstance(v["product"], str) and len(v["product"]) <= props["product"].get("maxLength", inf)
            and v["sentiment"] in props["sentiment"]["enum"]
            and isinstance(complaints, list) and len(complaints) <= props["complaints"].get("maxItems", inf)
            and all(isinstance(c, str) and len(c) <= props["complaints"]["items"].get("maxLength", inf)
                    for c in complaints))


def run(spec, loaded) -> dict:
    job = prepare(spec, loaded.tokenizer, loaded.max_context)
    engine = make_engine(spec, loaded, job.requests)
    t = time.perf_counter()
    out = {c.key: c for batch in engine.run(job.requests, job.plan) for c in batch}
    wall = time.perf_counter() - t
    report = job.constraint.report() if job.constraint else {}
    return {"wall": wall, "out": out, "steps": engine.stats["steps"], "mask_s": report.get("mask_s", 0.0),
            "masks": report.get("masks", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="spec override, a.b=value")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/constraint-cpu.jsonl"))
    args = ap.parse_args()
    spec = load_spec(ROOT / "examples/extract.yaml", args.overrides)
    schema = spec.sampling.constraint.json_schema
    loaded = load(spec.model, spec.engine)
    free = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"constraint": None})})
    runs = {"free": run(free, loaded), "constrained": run(spec, loaded)}
    row = {"bench": "constraint", "model": spec.model.path, "device": loaded.device, "dtype": loaded.dtype,
           "rows": len(runs["free"]["out"]), "max_tokens": spec.sampling.max_tokens}
    for name, r in runs.items():
        outs = r["out"].values()
        row[name] = {"generate_s": round(r["wall"], 2), "steps": r["steps"],
                     "output_tokens": sum(len(c.token_ids) for c in outs),
                     "valid_json_rate": round(sum(valid(c.text, schema) for c in outs) / len(outs), 4),
                     "parses_rate": round(sum(_parses(c.text) for c in outs) / len(outs), 4),
                     "finished_rate": round(sum(c.finish_reason == "stop" for c in outs) / len(outs), 4),
                     "mask_s": round(r["mask_s"], 3), "masks": r["masks"]}
    c = row["constrained"]
    row["mask_ms_per_token"] = round(1000 * c["mask_s"] / max(c["masks"], 1), 3)
    row["mask_share_of_generate"] = round(c["mask_s"] / runs["constrained"]["wall"], 4)
    row |= {"torch": torch.__version__, "threads": torch.get_num_threads(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d")}
    record(row, args.out)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
