"""GPU: how long loading a model directory takes, through batchrun's loader (``loader.load``: the tokenizer
and the weights) and the weights alone (``from_pretrained`` on the CPU, then ``.to(device)``), from a warm
page cache.

    python benchmarks/load_bench.py --model 1b --out benchmarks/results/load-h200.jsonl

The model is a random-weight Llama of the benchmark sizes, saved once as bf16 safetensors under --dir.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import MODELS, random_model
from results_io import git_commit, record

from batchrun.engine import loader
from batchrun.spec import EngineSpec, ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(MODELS))
    ap.add_argument("--dir", default="/tmp/batchrun-load-bench")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory saved next to the weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = Path(args.dir) / args.model
    if not (path / "config.json").is_file():
        model = random_model(args.model, "cuda")
        model.save_pretrained(path)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    for way in ("weights", "batchrun", "weights", "batchrun"):  # twice each: the page cache is warm by then
        torch.cuda.synchronize()
        t = time.perf_counter()
        if way == "batchrun":
            loaded = loader.load(ModelSpec(path=str(path), dtype="bfloat16"), EngineSpec(device="cuda"))
            model = loaded.model
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, use_safetensors=True)
            model.to("cuda").eval()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        record({"bench": "load", "model": args.model, "way": way, "bytes": size, "wall_s": round(wall, 3),
                "gb_per_s": round(size / wall / 1e9, 2), "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}, args.out)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
