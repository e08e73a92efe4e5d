"""CPU: what one token mask costs along random valid outputs of constraint_gpu.py's JSON schema, with its
strings bounded (``maxLength``, as in the example job) and unbounded — masks inside a bounded string are the
expensive ones. One matcher per output, one mask per token, the next token drawn at random among the allowed
ones (as a random-weight model does). SmolLM2's tokenizer (vocabulary 49152).

    python benchmarks/mask_cost.py --tokenizer .tok      # appends to benchmarks/results/mask-cost-cpu.jsonl
    PYTHONPATH=/tmp/xg python benchmarks/mask_cost.py    # xgrammar too, if importable (not a dependency)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constraint_gpu import SCHEMA
from results_io import git_commit, record

WIDE = 1000  # a mask allowing more tokens than this is "wide" (inside a string)


def walk(first_mask, consume, done, outputs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    costs, widths = [], []
    for _ in range(outputs):
        state = first_mask()
        for _ in range(60):
            if done(state):
                break
            t = time.perf_counter()
            bits = state.mask()
            costs.append(time.perf_counter() - t)
            allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[:49152])
            widths.append(len(allowed))
            consume(state, int(rng.choice(allowed)))
    us, w = np.array(costs) * 1e6, np.array(widths)
    return {"masks": len(us), "median_us": round(float(np.median(us)), 1), "mean_us": round(float(us.mean()), 1),
            "wide_masks": int((w > WIDE).sum()), "wide_mean_us": round(float(us[w > WIDE].mean()), 1),
            "narrow_mean_us": round(float(us[w <= WIDE].mean()), 1)}


class _LL:
    def __init__(self, compiled):
        from llguidance import LLMatcher

        self.m = LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)

    def mask(self):
        return np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)


class _XG:
    def __init__(self, compiled):
        import xgrammar

        self.m = xgrammar.GrammarMatcher(compiled)
        self.bits = xgrammar.allocate_token_bitmask(1, 49152)

    def mask(self):
        self.m.fill_next_token_bitmask(self.bits)
        return self.bits[0].numpy().view(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".tok")
    ap.add_argument("--outputs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from batchrun.engine.constraints import compile_constraint

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    unbounded = copy.deepcopy(SCHEMA)
    unbounded["properties"]["product"].pop("maxLength")
    unbounded["properties"]["complaints"]["items"].pop("maxLength")
    row = {"bench": "mask-cost", "tokenizer": "SmolLM2-135M-Instruct", "outputs": args.outputs}
    for name, schema in (("bounded", SCHEMA), ("unbounded", unbounded)):
        c = compile_constraint("json_schema", schema, tok)
        row[f"llguidance_{name}"] = walk(lambda c=c: _LL(c), lambda s, t: s.m.consume_token(t),
                                         lambda s: s.m.is_stopped(), args.outputs, 0)
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
    if xgrammar is not None:
        compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=49152))
        c = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        row["xgrammar_bounded"] = walk(lambda: _XG(c), lambda s, t: s.m.accept_token(t),
                                       lambda s: s.m.is_terminated(), args.outputs, 0)
        row["xgrammar_version"] = version("xgrammar")
    row["llguidance_version"] = version("llguidance")
    row |= {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, args.out or str(Path(__file__).resolve().parent / "results" / "mask-cost-cpu.jsonl"))


if __name__ == "__main__":
    main()
