"""Plain helpers for the constrained-decoding tests (``test_constraints.py``, ``test_masks.py``): the tiny model
they run, their requests, and one run of batchrun's engine or of the reference engine over them."""

from __future__ import annotations

import numpy as np

from batchrun.engine.batch import BatchEngine
from batchrun.engine.loader import load
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams, row_seed
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import EngineSpec, ModelSpec
from batchrun.tokens import TokenTable
from helpers import make_tiny_model

# Free text (bounded and not) inside an object: rows drawn before their wide masks, refused tokens, forced runs.
REVIEW = {"type": "object", "additionalProperties": False, "required": ["product", "complaints"],
          "properties": {"product": {"type": "string", "maxLength": 24},
                         "complaints": {"type": "array", "maxItems": 2, "items": {"type": "string"}}}}


def tiny_model(directory, tokenizer_dir: str):
    """The tiny random llama (seed 3) with SmolLM2's tokenizer, loaded in fp32 on the CPU."""
    path = make_tiny_model(directory, "llama", tokenizer_dir, seed=3)
    return load(ModelSpec(path=path, dtype="float32"), EngineSpec(device="cpu"))


def requests_for(tok, compiled, n: int = 6, max_tokens: int = 40, seed: int = 0) -> list[Request]:
    """``n`` requests, each with its own matcher of ``compiled``."""
    prompts = [f"Question {i}: what do you think of item {i * 7}?" for i in range(n)]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    return [Request(key=i, prompt_ids=p, max_tokens=max_tokens, seed=row_seed(seed, i), constraint=compiled.new())
            for i, p in enumerate(ids)]


def run_batchrun(loaded, reqs, params=None) -> dict:
    """batchrun's engine over ``reqs`` (small steps and blocks): key -> completion."""
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(loaded, params or SamplingParams(), 100_000, 4, 64)
    return {c.key: c for batch in engine.run(reqs, plan) for c in batch}


def run_reference(loaded, reqs, params=None) -> dict:
    """The reference engine over ``reqs``: key -> completion."""
    engine = ReferenceEngine(loaded, params or SamplingParams(), batch_size=4)
    return {c.key: c for batch in engine.run(reqs) for c in batch}
