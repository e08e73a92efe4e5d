"""Constrained decoding (``sampling.constraint``, llguidance): batchrun's engine equals the reference engine
token for token under every kind of constraint (fp32, a tiny random model with SmolLM2's tokenizer), every
output is valid, sampled runs repeat per row seed, rows drawn before their wide masks and rows preempted
give the same tokens. Through ``submit``: ``test_constraint_jobs.py``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import ConstraintError, compile_constraint
from batchrun.engine.grammar_pool import consume_drawn
from batchrun.engine.loader import load
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams, row_seed
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
    path = make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir, seed=3)
    return load(ModelSpec(path=path, dtype="float32"), EngineSpec(device="cpu"))


def _requests(tok, compiled, n: int = 6, max_tokens: int = 40, seed: int = 0) -> list[Request]:
    prompts = [f"Question {i}: what do you think of item {i * 7}?" for i in range(n)]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    return [Request(key=i, prompt_ids=p, max_tokens=max_tokens, seed=row_seed(seed, i), constraint=compiled.new())
            for i, p in enumerate(ids)]


def _batchrun(loaded, reqs, params=None) -> dict:
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(loaded, params or SamplingParams(), 100_000, 4, 64)
    return {c.key: c for batch in engine.run(reqs, plan) for c in batch}


@pytest.fixture(params=["launching-thread", "worker"])
def mask_thread(request, monkeypatch):
    """Both places the grammar work runs (``engine.masks.in_worker``): the launching thread (a GPU's
    default) and the worker thread (the CPU's)."""
    monkeypatch.setenv("BATCHRUN_MASK_WORKER", "0" if request.param == "launching-thread" else "1")
    return request.param


def _reference(loaded, reqs, params=None) -> dict:
    engine = ReferenceEngine(loaded, params or SamplingParams(), batch_size=4)
    return {c.key: c for batch in engine.run(reqs) for c in batch}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_constrained_greedy_equals_the_reference_engine_and_every_output_is_valid(tiny, kind, mask_thread):
    value, valid = CASES[kind]
    compiled = compile_constraint(kind.removesuffix("-gbnf"), value, tiny.tokenizer)
    got = _batchrun(tiny, _requests(tiny.tokenizer, compiled))
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    assert sorted(got) == sorted(want) == list(range(6))
    for k in got:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
        assert got[k].finish_reason == "stop" and valid(got[k].text), f"row {k}: {got[k].text!r}"


def test_forced_tokens_are_appended_without_a_sampling_step_each(tiny):
    """Where the schema forces text (keys, quotes, separators), batchrun's engine appends the forced tokens
    after the drawn one and computes them together: fewer steps than tokens, the same tokens."""
    compiled = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    reqs = _requests(tiny.tokenizer, compiled, n=1)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    (got,) = [c for batch in engine.run(reqs, plan) for c in batch]
    want = _reference(tiny, _requests(tiny.tokenizer, compiled, n=1))[0]
    assert got.token_ids == want.token_ids
    # One step of prefill, then one per drawn token (EOS included): far fewer than one per token.
    assert engine.stats["steps"] <= len(got.token_ids) // 2, (engine.stats, len(got.token_ids))


def test_rows_in_the_same_grammar_state_share_one_mask_and_forced_run(tiny, mask_thread):
    """Rows whose outputs so far are equal are in the same grammar state: their first masks (and the forced
    text that opens the object) are computed once for all of them, and every row still equals the reference
    engine's. Without sharing, the same run counts no shared masks."""
    compiled = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    got = _batchrun(tiny, _requests(tiny.tokenizer, compiled))
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    assert compiled.stats["masks_shared"] >= 5, compiled.stats  # (6 rows at their first mask: 1 computes it)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
    fresh = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    reqs = _requests(tiny.tokenizer, fresh, n=1)
    assert _batchrun(tiny, reqs)[0].token_ids == want[0].token_ids
    assert fresh.stats.get("masks_shared", 0) == 0


@pytest.mark.parametrize("shared", ["1", "0"])
def test_rows_matchers_copied_from_one_or_each_its_own_give_the_reference_tokens(tiny, monkeypatch, shared):
    """The rows' matchers are copies of one (sharing llguidance's lexer: small machines) or each its own (many
    CPUs): ``BATCHRUN_SHARED_MATCHERS`` chooses, and either way every row equals the reference engine's, rows
    drawn before their masks and restarted grammars included."""
    from batchrun.engine import constraints

    monkeypatch.setenv("BATCHRUN_SHARED_MATCHERS", shared)
    assert constraints.shared_matchers() is (shared == "1")
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    got = _batchrun(tiny, _requests(tiny.tokenizer, compiled))
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    assert compiled.stats["unmasked"] > compiled.stats["unmasked_allowed"], compiled.stats  # (some restarted)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
    a, b = compiled.new(), compiled.new()
    assert a._matcher.consume_tokens(tiny.tokenizer.encode('{"product": "x', add_special_tokens=False))
    assert b._matcher.compute_ff_bytes() == b'{"product": "'  # (a copy's state is its own)
    monkeypatch.delenv("BATCHRUN_SHARED_MATCHERS")
    monkeypatch.setattr(constraints.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert not constraints.shared_matchers()
    monkeypatch.setattr(constraints.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert constraints.shared_matchers()


REVIEW = {"type": "object", "additionalProperties": False, "required": ["product", "complaints"],
          "properties": {"product": {"type": "string", "maxLength": 24},
                         "complaints": {"type": "array", "maxItems": 2, "items": {"type": "string"}}}}


def test_rows_drawn_before_their_wide_masks_equal_the_reference_engine(tiny, monkeypatch, mask_thread):
    """Greedy rows inside free text (a mask allowing most of the vocabulary) are drawn without the mask and
    their token checked against the grammar after; a token it does not allow is drawn again from the masked
    logits. Both happen here, and every token equals the reference engine's and the fully masked run's."""
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    reqs = _requests(tiny.tokenizer, compiled)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    got = {c.key: c for batch in engine.run(reqs, plan) for c in batch}
    assert 0 < compiled.stats["unmasked_allowed"] < compiled.stats["unmasked"], compiled.stats
    steps = engine.stats["steps"]
    monkeypatch.setenv("BATCHRUN_LAZY_MASKS", "0")
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    masked = {c.key: c for batch in engine.run(_requests(tiny.tokenizer, compiled), plan) for c in batch}
    assert engine.stats["steps"] == steps  # (forced runs found as often: a forced state gets its mask)
    assert sorted(got) == sorted(want) == sorted(masked) == list(range(6))
    for k in got:
        assert got[k].token_ids == want[k].token_ids == masked[k].token_ids, f"row {k}"
        assert (got[k].text, got[k].finish_reason) == (want[k].text, want[k].finish_reason), f"row {k}"


def test_a_token_accepted_into_forced_text_sends_the_row_back_to_its_mask(tiny):
    """After a token drawn without its mask, a grammar that now forces what follows (the next key after a
    closed string) is marked for a mask, so its forced run is found as it would have been."""
    tok = tiny.tokenizer
    g = compile_constraint("json_schema", REVIEW, tok).new()
    g.allowed_tokens(tok.encode('{"product": "', add_special_tokens=False))
    g.width = tok.vocab_size  # (as after a wide mask)
    (word,) = tok.encode(" kettle", add_special_tokens=False)
    (quote,) = tok.encode('"', add_special_tokens=False)
    assert g.accepts(word) and g.width == tok.vocab_size  # inside the string: nothing forced
    assert not g.accepts(tok.eos_token_id)  # (not allowed: not consumed)
    assert g.accepts(quote) and g.width == 0  # ', "complaints": [' is forced now


def test_tokens_drawn_before_their_masks_are_taken_together_and_a_refused_one_restarts_its_grammar(tiny):
    """``consume_drawn``: many rows' tokens go to llguidance's pool at once. An allowed token is consumed (and a
    token into forced text resets the width); a refused one leaves that grammar restarted, and its next mask is
    exactly a fresh grammar's after the row's tokens."""
    tok = tiny.tokenizer
    compiled = compile_constraint("json_schema", REVIEW, tok)
    prefix = tok.encode('{"product": "', add_special_tokens=False)
    (word,) = tok.encode(" kettle", add_special_tokens=False)
    (quote,) = tok.encode('"', add_special_tokens=False)
    grammars = [compiled.new() for _ in range(5)]
    for g in grammars:
        g.allowed_tokens(prefix)
        g.width = tok.vocab_size
    drawn = [word, tok.eos_token_id, quote, word, tok.eos_token_id]
    assert consume_drawn(grammars, drawn) == [True, False, True, True, False]
    assert [g.width for g in grammars[:4:2]] == [tok.vocab_size, 0]  # (after the quote, a key is forced)
    for g, t in zip(grammars, drawn):
        after = prefix + [t] if t != tok.eos_token_id else prefix
        fresh = compiled.new()
        assert np.array_equal(g.allowed_tokens(after), fresh.allowed_tokens(after))


@pytest.mark.parametrize("cpus_setting", ["half", "all"])
def test_the_grammar_pool_keeps_to_the_upper_half_of_the_cpus(monkeypatch, cpus_setting):
    """From ``POOL_SPLIT_MIN`` CPUs, llguidance's pool threads are made on the upper half of the CPUs (the
    launching thread keeps the rest to itself), and the thread that made them keeps every CPU;
    ``BATCHRUN_GRAMMAR_CPUS=all`` leaves the pool on every CPU."""
    import os

    from batchrun.engine import grammar_pool

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    monkeypatch.setattr(grammar_pool, "POOL_SPLIT_MIN", 2)
    monkeypatch.setattr(grammar_pool, "_EXECUTOR", [])
    monkeypatch.setenv("BATCHRUN_GRAMMAR_CPUS", cpus_setting)
    before = set(os.listdir("/proc/self/task"))
    grammar_pool._executor()
    made = set(os.listdir("/proc/self/task")) - before
    expected = set(cpus[len(cpus) // 2 :]) if cpus_setting == "half" else set(cpus)
    assert made and all(os.sched_getaffinity(int(t)) == expected for t in made)
    assert os.sched_getaffinity(0) == set(cpus)


@pytest.mark.parametrize("setting", ["auto", "1", "0"])
def test_rows_are_drawn_before_their_masks_by_default_only_on_the_cpu(tiny, monkeypatch, setting):
    """By default greedy rows inside free text are drawn before their masks only where the forward pass runs on
    the CPU; on a GPU every mask is computed (``BATCHRUN_LAZY_MASKS``: 1, also there; 0, never). An engine
    deciding as on a GPU (on the CPU here) draws none before its mask unless told to, with the same tokens."""
    import batchrun.engine.masks as masks

    monkeypatch.setenv("BATCHRUN_LAZY_MASKS", setting)
    assert masks.draws_before_masks(pin=False) is (setting != "0")
    assert masks.draws_before_masks(pin=True) is (setting == "1")
    decide = masks.draws_before_masks
    monkeypatch.setattr(masks, "draws_before_masks", lambda pin: decide(True))  # (as on a GPU)
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    got = _batchrun(tiny, _requests(tiny.tokenizer, compiled))
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    assert (compiled.stats.get("unmasked", 0) > 0) is (setting == "1"), compiled.stats
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"


def test_drawing_before_the_mask_stops_where_the_drawn_tokens_are_often_refused(tiny, monkeypatch):
    """A constraint draws before its masks only while nearly all such tokens are allowed: of the random model's
    first ones, more than a tenth are refused, so after the trial (4 tokens here) every row is masked again,
    with the same tokens. (Without the rule this run draws 85 tokens before their masks.)"""
    import batchrun.engine.masks as masks

    monkeypatch.setattr(masks, "LAZY_TRIAL", 4)
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    got = _batchrun(tiny, _requests(tiny.tokenizer, compiled))
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    stats = compiled.stats
    assert stats["unmasked_allowed"] < masks.LAZY_MIN_ALLOWED * stats["unmasked"]
    assert 4 <= stats["unmasked"] <= 4 + 6  # (the trial, and at most one step of the 6 rows after it)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"


@pytest.mark.parametrize("schema", ["sentiment", "review"])
def test_constrained_rows_preempted_and_recomputed_equal_the_reference_engine(tiny, schema, mask_thread):
    """A row's next mask starts as soon as its token is recorded (or, inside free text, its token is checked
    after the draw); a row preempted before that step runs keeps its grammar where it was and gets its mask
    when it comes back: the same tokens as the reference engine."""
    value = SENTIMENT if schema == "sentiment" else REVIEW
    compiled = compile_constraint("json_schema", value, tiny.tokenizer)
    want = _reference(tiny, _requests(tiny.tokenizer, compiled))
    for budget in (80, 120):  # (80: the rows started early are more than the step's; 120: fewer)
        reqs = _requests(tiny.tokenizer, compiled)
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
    first = _batchrun(tiny, _requests(tiny.tokenizer, compiled, seed=5), params)
    again = _batchrun(tiny, _requests(tiny.tokenizer, compiled, seed=5), params)
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
    greedy = _batchrun(gpu, _requests(gpu.tokenizer, compiled, n=8))
    assert sorted(greedy) == list(range(8))
    assert all(c.finish_reason == "stop" and valid(c.text) for c in greedy.values()), greedy
    params = SamplingParams(temperature=1.0)
    first = _batchrun(gpu, _requests(gpu.tokenizer, compiled, n=8, seed=5), params)
    again = _batchrun(gpu, _requests(gpu.tokenizer, compiled, n=8, seed=5), params)
    assert {k: c.token_ids for k, c in first.items()} == {k: c.token_ids for k, c in again.items()}
    assert all(c.finish_reason == "stop" and valid(c.text) for c in first.values()), first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rows_drawn_before_their_wide_masks_on_the_gpu_equal_the_fully_masked_run(tmp_path, tokenizer_dir,
                                                                                  monkeypatch):
    """On the GPU in bf16, with decode steps from CUDA graphs: rows inside free text drawn before their masks
    give the same tokens and steps as every mask computed (the same steps run the same kernels)."""
    from batchrun.engine import runner

    monkeypatch.setattr(runner, "CAPTURE_AFTER", 0)
    path = make_tiny_model(tmp_path / "llama", "llama", tokenizer_dir, seed=3)
    gpu = load(ModelSpec(path=path, dtype="bfloat16"), EngineSpec(device="cuda"))
    compiled = compile_constraint("json_schema", REVIEW, gpu.tokenizer)
    runs = []
    for lazy in ("1", "0"):
        monkeypatch.setenv("BATCHRUN_LAZY_MASKS", lazy)
        reqs = _requests(gpu.tokenizer, compiled, n=16)
        plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs),
                          np.array([r.max_tokens for r in reqs]), PlanConfig(step_tokens=64, block_size=4))
        engine = BatchEngine(gpu, SamplingParams(), 100_000, 4, 64)
        runs.append(({c.key: c.token_ids for batch in engine.run(reqs, plan) for c in batch},
                     engine.stats["steps"]))
    assert compiled.stats["unmasked_allowed"] > 0, compiled.stats
    assert runs[0] == runs[1]


def test_a_grammar_that_cannot_finish_in_max_tokens_is_cut_at_the_limit(tiny):
    compiled = compile_constraint("regex", "[a-z]{50}", tiny.tokenizer)
    reqs = _requests(tiny.tokenizer, compiled, n=2, max_tokens=3)
    got = _batchrun(tiny, reqs)
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
    reqs = _requests(tiny.tokenizer, compiled, n=3, max_tokens=60)
    for c in _batchrun(tiny, reqs).values():
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

    got, want = _batchrun(loaded, requests()), _reference(loaded, requests())
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
        text = got[k].text
        if kind == "json_schema":
            assert valid_against(json.loads(text), SENTIMENT), text
        else:
            assert text in value if kind == "choices" else re.fullmatch(value, text), text

