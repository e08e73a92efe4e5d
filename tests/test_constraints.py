"""Constrained decoding (``sampling.constraint``, llguidance): batchrun's engine equals the reference engine
token for token under every kind of constraint (fp32, a tiny random model with SmolLM2's tokenizer), every
output is valid, sampled runs repeat per row seed, rows preempted give the same tokens. The mask pipeline
(shared masks, rows drawn before their masks, matchers, the pool): ``test_masks.py``. Through ``submit``:
``test_constraint_jobs.py``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from constraint_runs import REVIEW, requests_for, run_batchrun, run_reference, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import ConstraintError, compile_constraint
from batchrun.engine.loader import load
from batchrun.engine.requests import Request, SamplingParams
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import EngineSpec, ModelSpec
from batchrun.tokens import TokenTable
from helpers import SENTIMENT, make_tiny_model, valid_against

CASES = {
    "regex": ("[0-9]{3}-[a-z]{2,4}", lambda s: re.fullmatch("[0-9]{3}-[a-z]{2,4}", s)),
    "choices": (["yes", "no", "maybe not"], lambda s: s in ("yes", "no", "maybe not")),
    "json_schema": (SENTIMENT, lambda s: valid_against(json.loads(s), SENTIMENT)),
    "grammar": ('start: "a" b+ "z"\nb: "x" | "y"', lambda s: re.fullmatch("a[xy]+z", s)),
    "grammar-gbnf": ('root ::= "a" [xy]+ "z"', lambda s: re.fullmatch("a[xy]+z", s)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return tiny_model(tmp_path_factory.mktemp("llama"), tokenizer_dir)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_constrained_greedy_equals_the_reference_engine_and_every_output_is_valid(tiny, kind, mask_thread):
    value, valid = CASES[kind]
    compiled = compile_constraint(kind.removesuffix("-gbnf"), value, tiny.tokenizer)
    got = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled))
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    assert sorted(got) == sorted(want) == list(range(6))
    for k in got:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
        assert got[k].finish_reason == "stop" and valid(got[k].text), f"row {k}: {got[k].text!r}"


def test_forced_tokens_are_appended_without_a_sampling_step_each(tiny):
    """Where the schema forces text (keys, quotes, separators), batchrun's engine appends the forced tokens
    after the drawn one and computes them together: fewer steps than tokens, the same tokens."""
    compiled = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    reqs = requests_for(tiny.tokenizer, compiled, n=1)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    (got,) = [c for batch in engine.run(reqs, plan) for c in batch]
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled, n=1))[0]
    assert got.token_ids == want.token_ids
    # One step of prefill, then one per drawn token (EOS included): far fewer than one per token.
    assert engine.stats["steps"] <= len(got.token_ids) // 2, (engine.stats, len(got.token_ids))


@pytest.mark.parametrize("schema", ["sentiment", "review"])
def test_constrained_rows_preempted_and_recomputed_equal_the_reference_engine(tiny, schema, mask_thread):
    """A row's next mask starts as soon as its token is recorded (or, inside free text, its token is checked
    after the draw); a row preempted before that step runs keeps its grammar where it was and gets its mask
    when it comes back: the same tokens as the reference engine."""
    value = SENTIMENT if schema == "sentiment" else REVIEW
    compiled = compile_constraint("json_schema", value, tiny.tokenizer)
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    for budget in (80, 120):  # (80: the rows started early are more than the step's; 120: fewer)
        reqs = requests_for(tiny.tokenizer, compiled)
        plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                          PlanConfig(step_tokens=64, block_size=4))
        # Estimates of 5% of max_tokens admit too much; the pool then runs dry mid-decode.
        engine = BatchEngine(tiny, SamplingParams(), budget, 4, 64, initial_estimate=0.05)
        got = {c.key: c for batch in engine.run(reqs, plan) for c in batch}
        assert engine.stats["preemptions"] > 0
        assert sorted(got) == list(range(6))
        for k in got:
            assert got[k].token_ids == want[k].token_ids, f"budget {budget}, row {k}"
            if schema == "sentiment":  # (review rows may be cut at max_tokens: the reference's are cut the same)
                assert valid_against(json.loads(got[k].text), SENTIMENT), f"row {k}: {got[k].text!r}"


def test_sampled_constrained_rows_repeat_per_row_seed_and_stay_valid(tiny):
    value, valid = CASES["json_schema"]
    compiled = compile_constraint("json_schema", value, tiny.tokenizer)
    params = SamplingParams(temperature=1.0)
    first = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled, seed=5), params)
    again = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled, seed=5), params)
    assert {k: c.token_ids for k, c in first.items()} == {k: c.token_ids for k, c in again.items()}
    assert all(valid(c.text) for c in first.values())
    assert len({c.text for c in first.values()}) > 1  # sampled: not every row the same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(CASES))
def test_constrained_decoding_on_the_gpu_is_valid_and_repeats(tmp_path, tokenizer_dir, monkeypatch, kind):
    """On the GPU in bf16 (paged backend, decode steps from CUDA graphs), with masks applied on the device:
    every greedy output is complete and valid, and sampled rows repeat per row seed and stay valid."""
    from batchrun.engine import runner

    monkeypatch.setattr(runner, "CAPTURE_AFTER", 0)
    path = make_tiny_model(tmp_path / "llama", "llama", tokenizer_dir, seed=3)
    gpu = load(ModelSpec(path=path, dtype="bfloat16"), EngineSpec(device="cuda"))
    value, valid = CASES[kind]
    compiled = compile_constraint(kind.removesuffix("-gbnf"), value, gpu.tokenizer)
    greedy = run_batchrun(gpu, requests_for(gpu.tokenizer, compiled, n=8))
    assert sorted(greedy) == list(range(8))
    assert all(c.finish_reason == "stop" and valid(c.text) for c in greedy.values()), greedy
    params = SamplingParams(temperature=1.0)
    first = run_batchrun(gpu, requests_for(gpu.tokenizer, compiled, n=8, seed=5), params)
    again = run_batchrun(gpu, requests_for(gpu.tokenizer, compiled, n=8, seed=5), params)
    assert {k: c.token_ids for k, c in first.items()} == {k: c.token_ids for k, c in again.items()}
    assert all(c.finish_reason == "stop" and valid(c.text) for c in first.values()), first


def test_a_grammar_that_cannot_finish_in_max_tokens_is_cut_at_the_limit(tiny):
    compiled = compile_constraint("regex", "[a-z]{50}", tiny.tokenizer)
    reqs = requests_for(tiny.tokenizer, compiled, n=2, max_tokens=3)
    got = run_batchrun(tiny, reqs)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 3 for c in got.values())
    assert all(r.constraint.incomplete(got[r.key].token_ids) for r in reqs)
    assert not compiled.new().incomplete(tiny.tokenizer("a" * 50, add_special_tokens=False)["input_ids"])


# Generated schemas: objects of 1-3 properties, each an enum, a boolean, a bounded integer or a short array.
_leaf = st.one_of(
    st.lists(st.sampled_from(["red", "green", "blue", "n/a", "x y"]), min_size=1, max_size=3, unique=True)
    .map(lambda e: {"enum": e}),
    st.just({"type": "boolean"}),
    st.integers(0, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 20}),
)
_prop = st.one_of(_leaf, _leaf.map(lambda s: {"type": "array", "items": s, "maxItems": 3}))
_schemas = st.dictionaries(st.sampled_from(["a", "b", "name", "tags"]), _prop, min_size=1, max_size=3).flatmap(
    lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
        lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas)
def test_every_output_under_a_generated_schema_is_valid(tiny, schema):
    compiled = compile_constraint("json_schema", schema, tiny.tokenizer)
    reqs = requests_for(tiny.tokenizer, compiled, n=3, max_tokens=60)
    for c in run_batchrun(tiny, reqs).values():
        if c.finish_reason == "stop":
            assert valid_against(json.loads(c.text), schema), c.text
        else:  # cut at max_tokens: must be reported as incomplete
            assert reqs[c.key].constraint.incomplete(c.token_ids)


@pytest.mark.parametrize("text", ["hello world", " two  spaces", "café au lait", "tab\there"])
def test_the_tokenizers_own_tokens_of_a_valid_output_satisfy_the_grammar(tiny, text):
    """llguidance must read tokens as their bytes (a GGUF-converted byte-level tokenizer once made it read
    "Ġy" as the characters, so a space in an output broke the grammar)."""
    tok = tiny.tokenizer
    compiled = compile_constraint("choices", [text, "other"], tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    grammar = compiled.new()
    for j in range(len(ids)):
        assert grammar.allowed_tokens(ids[:j])[ids[j]], f"token {j} of {text!r}"
    assert not grammar.incomplete(ids)


def test_a_bad_constraint_names_what_is_wrong(tiny):
    with pytest.raises(ConstraintError, match="unclosed character class"):
        compile_constraint("regex", "[a-z", tiny.tokenizer)
    with pytest.raises(ConstraintError, match="Invalid type: nonsense"):
        compile_constraint("json_schema", {"type": "nonsense"}, tiny.tokenizer)


# ---------------------------------------------------------------------------------------- through submit


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["json_schema", "choices", "regex"])
def test_constrained_greedy_on_smollm2_equals_the_reference_engine(smollm2_dir, kind):
    """The real model (fp32, CPU) under each kind of constraint: token for token the reference engine's."""
    loaded = load(ModelSpec(path=smollm2_dir), EngineSpec(device="cpu"))
    tok = loaded.tokenizer
    value = {"json_schema": SENTIMENT, "choices": ["positive", "negative", "mixed"],
             "regex": "[A-Z][a-z]+ [0-9]{2}"}[kind]
    compiled = compile_constraint(kind, value, tok)
    reviews = ["The kettle boils fast and looks great.", "Broke after two days, awful support.",
               "Sound is fine but the case feels cheap.", "Absolutely love this lamp!"]

    def requests() -> list[Request]:
        texts = [tok.apply_chat_template([{"role": "user", "content": f"Classify this review as JSON: {r}"}],
                                         tokenize=False, add_generation_prompt=True) for r in reviews]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [Request(key=i, prompt_ids=p, max_tokens=40, constraint=compiled.new()) for i, p in enumerate(ids)]

    got, want = run_batchrun(loaded, requests()), run_reference(loaded, requests())
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
        text = got[k].text
        if kind == "json_schema":
            assert valid_against(json.loads(text), SENTIMENT), text
        else:
            assert text in value if kind == "choices" else re.fullmatch(value, text), text

