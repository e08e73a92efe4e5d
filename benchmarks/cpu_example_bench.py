"""CPU: the example job's generation phase, reference engine vs batchrun's engine, in one process.

    python benchmarks/cpu_example_bench.py            # appends a line to benchmarks/results/cpu-example.jsonl

Both engines get the same model (SmolLM2-135M-Instruct, fp32), the same requests and the same plan; the
timer covers generation only (model loading, reading and tokenizing are shared and excluded). The outputs
are compared token for token.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

from batchrun.engine.factory import kv_usage, make_engine
from batchrun.engine.loader import load
from batchrun.engine.reference import ReferenceEngine
from batchrun.runtime.prepare import prepare
from batchrun.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-example.jsonl"


def timed(engine, requests, plan) -> tuple[float, dict]:
    t = time.perf_counter()
    out = {c.key: c for batch in engine.run(requests, plan) for c in batch}
    return time.perf_counter() - t, out


def main() -> None:
    spec = load_spec(Path(__file__).resolve().parents[1] / "jobs/example.yaml", sys.argv[1:])
    loaded = load(spec.model, spec.engine)
    job = prepare(spec, loaded.tokenizer, loaded.max_context)
    requests, plan = job.requests, job.plan
    reference = spec.model_copy(update={"engine": spec.engine.model_copy(update={"backend": "reference"})})
    ref_engine = make_engine(reference, loaded, requests)
    assert isinstance(ref_engine, ReferenceEngine)
    ours = make_engine(spec, loaded, requests)
    t_ref, ref = timed(ref_engine, requests, plan)
    t_ours, got = timed(ours, requests, plan)
    budget, _ = kv_usage(ours)
    same = sum(got[i].token_ids == ref[i].token_ids for i in ref)
    commit = git_commit()
    row = {"bench": "cpu-example", "model": spec.model.path, "dtype": loaded.dtype, "rows": len(requests),
           "prompt_tokens": int(sum(len(r.prompt_ids) for r in requests)),
           "prefill_tokens_after_sharing": plan.prefill_tokens(),
           "output_tokens": sum(len(c.token_ids) for c in ref.values()),
           "reference_generate_s": round(t_ref, 2), "batchrun_generate_s": round(t_ours, 2),
           "speedup": round(t_ref / t_ours, 2), "identical_rows": same, "engine_stats": ours.stats,
           "reference_batch_size": spec.engine.batch_size, "kv_budget_tokens": budget,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "commit": commit, "date": time.strftime("%Y-%m-%d")}
    record(row, RESULTS)


if __name__ == "__main__":
    main()
