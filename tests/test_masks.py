"""The mask pipeline of constrained decoding (``engine.masks``, ``engine.grammar_pool``): rows in one grammar state
share a mask, rows' matchers copied from one or each its own, rows drawn before their wide masks (checked
after, refused tokens drawn again, the rule that stops it, and its default: the CPU only), llguidance's pool
on its CPUs. Every run's tokens equal the reference engine's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from constraint_runs import REVIEW, requests_for, run_batchrun, run_reference, tiny_model

from batchrun.engine.batch import BatchEngine
from batchrun.engine.constraints import compile_constraint
from batchrun.engine.grammar_pool import StepMasks, consume_drawn
from batchrun.engine.loader import load
from batchrun.engine.requests import SamplingParams
from batchrun.engine.sampling import apply_mask_bits
from batchrun.errors import RuntimeFailure
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.spec import EngineSpec, ModelSpec
from batchrun.tokens import TokenTable
from helpers import SENTIMENT, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    return tiny_model(tmp_path_factory.mktemp("llama"), tokenizer_dir)


def test_rows_in_the_same_grammar_state_share_one_mask_and_forced_run(tiny, mask_thread):
    """Rows whose outputs so far are equal are in the same grammar state: their first masks (and the forced
    text that opens the object) are computed once for all of them, and every row still equals the reference
    engine's. Without sharing, the same run counts no shared masks."""
    compiled = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    got = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled))
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    assert compiled.stats["masks_shared"] >= 5, compiled.stats  # (6 rows at their first mask: 1 computes it)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
    fresh = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    reqs = requests_for(tiny.tokenizer, fresh, n=1)
    assert run_batchrun(tiny, reqs)[0].token_ids == want[0].token_ids
    assert fresh.stats.get("masks_shared", 0) == 0


def test_rows_sharing_a_mask_get_it_where_it_is_applied_as_if_copied(tiny):
    """A row in the same grammar state as a row before it has that row's mask gathered where the masks are
    applied (``shared_rows``): the same masked logits as with the mask copied into its own row on the host."""
    compiled = compile_constraint("json_schema", SENTIMENT, tiny.tokenizer)
    opened = tiny.tokenizer.encode('{"label": "', add_special_tokens=False)
    generated = [[], opened, [], list(opened)]
    words = (tiny.tokenizer.vocab_size + 31) // 32
    job = StepMasks([compiled.new() for _ in generated], generated, np.zeros((4, words), dtype=np.int32))
    job.take_and_mask()
    job.finish()
    rows = job.shared_rows()
    assert rows.tolist() == [0, 1, 0, 1]
    assert not job.out[2].any() and not job.out[3].any()  # (left to the gather)
    logits = torch.randn(4, tiny.tokenizer.vocab_size)
    gathered = apply_mask_bits(logits, torch.from_numpy(job.out), torch.from_numpy(rows))
    job.fill_shared()
    assert np.array_equal(job.out[2], job.out[0]) and np.array_equal(job.out[3], job.out[1])
    assert not np.array_equal(job.out[0], job.out[1])
    assert torch.equal(gathered, apply_mask_bits(logits, torch.from_numpy(job.out)))
    alone = StepMasks([compiled.new()], [[]], np.zeros((1, words), dtype=np.int32))
    alone.compute()
    assert alone.shared_rows() is None and np.array_equal(alone.out[0], job.out[0])


@pytest.mark.parametrize("shared", ["1", "0", "3"])
def test_rows_matchers_copied_from_one_or_each_its_own_give_the_reference_tokens(tiny, monkeypatch, shared):
    """The rows' matchers are copies of one (sharing llguidance's lexer: small machines), each its own, or
    copies of one per group of rows (many CPUs): ``BATCHRUN_SHARED_MATCHERS`` chooses, and either way every row
    equals the reference engine's, rows drawn before their masks and restarted grammars included."""
    from batchrun.engine import constraints

    monkeypatch.setenv("BATCHRUN_SHARED_MATCHERS", shared)
    assert constraints.matcher_group() == {"1": None, "0": 0, "3": 3}[shared]
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    got = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled))
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    assert compiled.stats["unmasked"] > compiled.stats["unmasked_allowed"], compiled.stats  # (some restarted)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"
    a, b = compiled.new(), compiled.new()
    assert a._matcher.consume_tokens(tiny.tokenizer.encode('{"product": "x', add_special_tokens=False))
    assert b._matcher.compute_ff_bytes() == b'{"product": "'  # (a copy's state is its own)
    monkeypatch.delenv("BATCHRUN_SHARED_MATCHERS")
    monkeypatch.setattr(constraints.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert constraints.matcher_group() == constraints.GROUP_ROWS
    monkeypatch.setattr(constraints.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert constraints.matcher_group() is None


def test_rows_share_a_template_per_group_of_rows(tiny, monkeypatch):
    """``BATCHRUN_SHARED_MATCHERS=3``: every third row's matcher starts a new template (a lexer of its own);
    checking an output copies the current one without starting a group; a bad value is a clear error."""

    monkeypatch.setenv("BATCHRUN_SHARED_MATCHERS", "3")
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    templates = []
    for _ in range(7):
        compiled.new()
        templates.append(compiled._template[0])
        compiled.matcher()  # (an output's check)
    assert [len({id(t) for t in templates[:i]}) for i in (3, 4, 6, 7)] == [1, 2, 2, 3]
    monkeypatch.setenv("BATCHRUN_SHARED_MATCHERS", "some")
    with pytest.raises(RuntimeFailure, match="BATCHRUN_SHARED_MATCHERS='some': expected 1"):
        compile_constraint("json_schema", REVIEW, tiny.tokenizer).new()


def test_rows_drawn_before_their_wide_masks_equal_the_reference_engine(tiny, monkeypatch, mask_thread):
    """Greedy rows inside free text (a mask allowing most of the vocabulary) are drawn without the mask and
    their token checked against the grammar after; a token it does not allow is drawn again from the masked
    logits. Both happen here, and every token equals the reference engine's and the fully masked run's."""
    compiled = compile_constraint("json_schema", REVIEW, tiny.tokenizer)
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    reqs = requests_for(tiny.tokenizer, compiled)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    got = {c.key: c for batch in engine.run(reqs, plan) for c in batch}
    assert 0 < compiled.stats["unmasked_allowed"] < compiled.stats["unmasked"], compiled.stats
    steps = engine.stats["steps"]
    monkeypatch.setenv("BATCHRUN_LAZY_MASKS", "0")
    engine = BatchEngine(tiny, SamplingParams(), 100_000, 4, 64)
    masked = {c.key: c for batch in engine.run(requests_for(tiny.tokenizer, compiled), plan) for c in batch}
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


@pytest.fixture
def split_pool(monkeypatch):
    """A fresh llguidance pool that splits the CPUs from 2 of them on: this process's CPUs."""
    import os

    from batchrun.engine import grammar_pool

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    monkeypatch.setattr(grammar_pool, "POOL_SPLIT_MIN", 2)
    monkeypatch.setattr(grammar_pool, "_POOLS", {})
    return cpus


@pytest.mark.parametrize("cpus_setting", ["half", "all"])
def test_the_grammar_pool_keeps_to_the_upper_half_of_the_cpus(monkeypatch, split_pool, cpus_setting):
    """From ``POOL_SPLIT_MIN`` CPUs, llguidance's pool threads are made on the upper half of the CPUs (the
    launching thread keeps the rest to itself), and the thread that made them keeps every CPU;
    ``BATCHRUN_GRAMMAR_CPUS=all`` leaves the pool on every CPU."""
    import os

    from batchrun.engine import grammar_pool

    cpus = split_pool
    monkeypatch.setenv("BATCHRUN_GRAMMAR_CPUS", cpus_setting)
    before = set(os.listdir("/proc/self/task"))
    grammar_pool._executor()
    made = set(os.listdir("/proc/self/task")) - before
    expected = set(cpus[len(cpus) // 2 :]) if cpus_setting == "half" else set(cpus)
    assert made and all(os.sched_getaffinity(int(t)) == expected for t in made)
    assert os.sched_getaffinity(0) == set(cpus)
    assert grammar_pool.launcher_cpus() == (cpus[: len(cpus) // 2] if cpus_setting == "half" else [])


def test_each_pool_setting_has_its_own_pool_and_a_bad_thread_count_is_a_clear_error(monkeypatch):
    """``BATCHRUN_GRAMMAR_THREADS`` picks the pool's size: each setting gets its own pool, made once (so that a
    benchmark can interleave them in one process), and a bad value is an error naming the variable."""
    from batchrun.engine import grammar_pool
    from batchrun.errors import RuntimeFailure

    monkeypatch.setattr(grammar_pool, "_POOLS", {})
    monkeypatch.setenv("BATCHRUN_GRAMMAR_THREADS", "1")
    one = grammar_pool._executor()
    monkeypatch.setenv("BATCHRUN_GRAMMAR_THREADS", "2")
    two = grammar_pool._executor()
    assert one is not two and grammar_pool._executor() is two
    monkeypatch.setenv("BATCHRUN_GRAMMAR_THREADS", "1")
    assert grammar_pool._executor() is one
    monkeypatch.setenv("BATCHRUN_GRAMMAR_THREADS", "many")
    with pytest.raises(RuntimeFailure, match="BATCHRUN_GRAMMAR_THREADS='many': expected a number of threads"):
        grammar_pool._executor()


def _steps(seen: list, n: int = 2, fail: bool = False):
    """A run's steps, each noting the launching thread's CPUs and the switch interval it ran with."""
    import os
    import sys

    for i in range(n):
        seen.append((os.sched_getaffinity(0), sys.getswitchinterval()))
        if fail:
            raise RuntimeError("a step failed")
        yield i


@pytest.mark.parametrize("worker,cpus_setting,gpu", [("1", "other", True), ("0", "other", True),
                                                     ("1", "all", True), ("1", "other", False)])
def test_a_gpu_run_keeps_its_launching_thread_off_the_pools_cpus(monkeypatch, split_pool, worker, cpus_setting,
                                                                  gpu):
    """A GPU run with constraints (``MaskPipeline.launching``) makes each step on the CPUs the pool leaves
    (``BATCHRUN_LAUNCHER_CPUS=all``: every CPU), while the code taking its output keeps every CPU; with the
    mask worker the GIL's switch interval is ``SWITCH_S`` for the run. Both are put back afterwards, also when a
    step fails, and a CPU run changes neither."""
    import os
    import sys

    from batchrun.engine import masks

    cpus = split_pool
    monkeypatch.setenv("BATCHRUN_MASK_WORKER", worker)
    monkeypatch.setenv("BATCHRUN_LAUNCHER_CPUS", cpus_setting)
    interval = sys.getswitchinterval()
    pipeline = masks.MaskPipeline(vocab=64, pin=gpu, greedy=True)
    seen: list = []
    taken = [(os.sched_getaffinity(0), sys.getswitchinterval()) for _ in pipeline.launching(_steps(seen))]
    kept = set(cpus[: len(cpus) // 2]) if gpu and cpus_setting == "other" else set(cpus)
    switch = masks.SWITCH_S if gpu and worker == "1" else interval
    assert [c for c, _ in seen] == [kept, kept]
    assert [s for _, s in seen] == pytest.approx([switch, switch])
    assert [c for c, _ in taken] == [set(cpus), set(cpus)]
    assert (os.sched_getaffinity(0), sys.getswitchinterval()) == (set(cpus), interval)
    with pytest.raises(RuntimeError, match="a step failed"):
        list(pipeline.launching(_steps([], fail=True)))
    assert (os.sched_getaffinity(0), sys.getswitchinterval()) == (set(cpus), interval)


def test_the_mask_worker_is_made_on_every_cpu_not_on_a_steps(monkeypatch, split_pool):
    """The mask worker's thread is made before the first step is pinned: it does not keep the launching
    thread's CPUs of that step."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from batchrun.engine import masks

    cpus = split_pool
    monkeypatch.setenv("BATCHRUN_MASK_WORKER", "1")
    monkeypatch.delenv("BATCHRUN_LAUNCHER_CPUS", raising=False)
    fresh: list[ThreadPoolExecutor] = []
    monkeypatch.setattr(masks, "_WORKER", fresh)

    def steps():
        yield masks.worker().submit(os.sched_getaffinity, 0).result()  # (the worker's first use: in a step)

    assert list(masks.MaskPipeline(vocab=64, pin=True, greedy=True).launching(steps())) == [set(cpus)]
    fresh[0].shutdown()


def test_overlapping_gpu_runs_put_the_switch_interval_back_when_the_last_ends(monkeypatch):
    """Two GPU runs with the mask worker in one process: the switch interval stays ``SWITCH_S`` until the last of
    them ends, then is what it was; a bad ``BATCHRUN_MASK_SWITCH_S`` is a clear error."""
    import sys

    from batchrun.engine import masks
    from batchrun.errors import RuntimeFailure

    monkeypatch.setenv("BATCHRUN_MASK_WORKER", "1")
    monkeypatch.setenv("BATCHRUN_LAUNCHER_CPUS", "all")
    interval = sys.getswitchinterval()
    first, second = (masks.MaskPipeline(vocab=64, pin=True, greedy=True).launching(_steps([])) for _ in range(2))
    next(first)
    next(second)
    list(first)
    assert sys.getswitchinterval() == pytest.approx(masks.SWITCH_S)
    list(second)
    assert sys.getswitchinterval() == interval
    monkeypatch.setenv("BATCHRUN_MASK_SWITCH_S", "fast")
    bad = masks.MaskPipeline(vocab=64, pin=True, greedy=True).launching(_steps([]))
    with pytest.raises(RuntimeFailure, match="BATCHRUN_MASK_SWITCH_S='fast': expected a number of seconds"):
        next(bad)
    assert sys.getswitchinterval() == interval


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
    got = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled))
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
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
    got = run_batchrun(tiny, requests_for(tiny.tokenizer, compiled))
    want = run_reference(tiny, requests_for(tiny.tokenizer, compiled))
    stats = compiled.stats
    assert stats["unmasked_allowed"] < masks.LAZY_MIN_ALLOWED * stats["unmasked"]
    assert 4 <= stats["unmasked"] <= 4 + 6  # (the trial, and at most one step of the 6 rows after it)
    for k in want:
        assert got[k].token_ids == want[k].token_ids, f"row {k}"


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
        reqs = requests_for(gpu.tokenizer, compiled, n=16)
        plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs),
                          np.array([r.max_tokens for r in reqs]), PlanConfig(step_tokens=64, block_size=4))
        engine = BatchEngine(gpu, SamplingParams(), 100_000, 4, 64)
        runs.append(({c.key: c.token_ids for batch in engine.run(reqs, plan) for c in batch},
                     engine.stats["steps"]))
    assert compiled.stats["unmasked_allowed"] > 0, compiled.stats
    assert runs[0] == runs[1]


def test_only_runs_with_a_grammar_make_their_steps_under_the_pools_settings(tokenizer_dir):
    """A GPU run's steps are made under ``MaskPipeline.launching`` (the launching thread off the pool's CPUs, the
    switch interval) only when some row has a grammar: BatchPrompt's label slots alone make no pool work."""
    from transformers import AutoTokenizer

    from batchrun.engine.masks import uses_pool
    from batchrun.engine.slots import LabelSlots

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    slots = LabelSlots([10, 11], [[5], []], [0])
    grammar = compile_constraint("regex", "[ab]{1,3}", tok).new()
    assert not uses_pool([None, None])
    assert not uses_pool([slots, None, slots])
    assert uses_pool([slots, None, grammar])
    assert uses_pool(iter([grammar]))
