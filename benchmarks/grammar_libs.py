"""CPU: llguidance vs xgrammar on batchrun's constraint work — building the tokenizer view, compiling the
extraction example's JSON schema and a regex, and computing one token mask per output token along valid
outputs (SmolLM2's tokenizer, vocabulary 49152). The library batchrun uses was chosen on these numbers.

    pip install --target /tmp/xg xgrammar apache-tvm-ffi --no-deps
    PYTHONPATH=/tmp/xg python benchmarks/grammar_libs.py     # appends to benchmarks/results/grammar-libs-cpu.jsonl

xgrammar is not a dependency of batchrun (it also needs torch and Triton at import); it is measured here only.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import git_commit, record

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment", "complaints"],
          "properties": {"product": {"type": "string", "maxLength": 40},
                         "sentiment": {"enum": ["positive", "negative", "mixed"]},
                         "complaints": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 60}}}}
OUTPUTS = ['{"product": "electric kettle", "sentiment": "mixed", "complaints": ["lid is hard to open", "short cord"]}',
           '{"product": "desk lamp", "sentiment": "positive", "complaints": []}',
           '{"product": "wireless earbuds", "sentiment": "negative", "complaints": ["battery dies fast"]}']
REGEX = "[A-Z][a-z]+ [0-9]{2}-[0-9]{4}"
REGEX_OUTPUTS = ["Order 12-3456", "Ticket 99-0001"]


def _ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 4)


def bench_llguidance(tok, cases) -> dict:
    from llguidance import LLMatcher

    from batchrun.engine.constraints import _TOKENIZERS, JSON_STYLE, grammar_text, ll_tokenizer

    _TOKENIZERS.clear()
    t = time.perf_counter()
    lt = ll_tokenizer(tok)
    out = {"tokenizer_s": round(time.perf_counter() - t, 3)}
    for name, (kind, value, texts) in cases.items():
        t = time.perf_counter()
        grammar = grammar_text(kind, value)
        LLMatcher.validate_grammar(grammar, lt)
        compile_s = time.perf_counter() - t
        masks = []
        for text in texts:
            m = LLMatcher(lt, grammar, log_level=0)
            for tid in tok(text, add_special_tokens=False)["input_ids"]:
                t = time.perf_counter()
                np.frombuffer(m.compute_bitmask(), dtype=np.uint8)  # (the bitmask, as xgrammar's below)
                masks.append(time.perf_counter() - t)
                assert m.consume_token(tid), (name, text)
        out[name] = {"compile_s": round(compile_s, 4), "mask_ms_median": _ms(masks), "masks": len(masks)}
    out["json_style"] = JSON_STYLE
    return out


def bench_xgrammar(tok, cases) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    out = {"tokenizer_s": round(time.perf_counter() - t, 3)}
    for name, (kind, value, texts) in cases.items():
        t = time.perf_counter()
        if kind == "json_schema":
            compiled = compiler.compile_json_schema(json.dumps(value), any_whitespace=False, separators=(", ", ": "))
        else:
            compiled = compiler.compile_regex(value)
        compile_s = time.perf_counter() - t
        masks = []
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for text in texts:
            m = xgr.GrammarMatcher(compiled)
            for tid in tok(text, add_special_tokens=False)["input_ids"]:
                t = time.perf_counter()
                m.fill_next_token_bitmask(bitmask)
                bitmask.numpy().view(np.uint8)  # (the same hand-over as llguidance's bytes)
                masks.append(time.perf_counter() - t)
                assert m.accept_token(tid), (name, text)
        out[name] = {"compile_s": round(compile_s, 4), "mask_ms_median": _ms(masks), "masks": len(masks)}
    return out


def main() -> None:
    from transformers import AutoTokenizer

    from batchrun.engine.loader import resolve
    from batchrun.spec import ModelSpec

    tok = AutoTokenizer.from_pretrained(resolve(ModelSpec(path="smollm2-135m-instruct")))
    cases = {"json_schema": ("json_schema", SCHEMA, OUTPUTS), "regex": ("regex", REGEX, REGEX_OUTPUTS)}
    row = {"bench": "grammar-libs", "tokenizer": "SmolLM2-135M-Instruct", "vocab": len(tok),
           "llguidance": bench_llguidance(tok, cases)}
    try:
        row["xgrammar"] = bench_xgrammar(tok, cases)
    except ImportError as e:
        row["xgrammar"] = {"error": f"not installed ({e})"}
    import importlib.metadata as md

    row["versions"] = {p: md.version(p) for p in ("llguidance", "xgrammar") if _installed(p)}
    row |= {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    record(row, ROOT / "benchmarks/results/grammar-libs-cpu.jsonl")


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
