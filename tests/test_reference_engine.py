"""The reference engine against the oracle: plain ``generate`` run one prompt at a time (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from batchrun.engine.loader import load
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams, row_seed
from batchrun.engine.sampling import sampling_probs
from batchrun.spec import EngineSpec, ModelSpec
from helpers import make_tiny_model

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Hi",
    "Summarize: the kettle boils fast, the handle stays cool, and the lid never leaks. Verdict:",
    "1, 2, 3, 4,",
    "A very long prompt " * 12,
    "Question: what is the capital of France?\nAnswer:",
    "x",
]


def _load(path: str):
    return load(ModelSpec(path=path), EngineSpec(device="cpu"))


def _requests(tok, max_tokens: list[int], seed: int = 0) -> list[Request]:
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    return [Request(key=i, prompt_ids=p, max_tokens=m, seed=row_seed(seed, i))
            for i, (p, m) in enumerate(zip(ids, max_tokens))]


def _oracle(loaded, req: Request, ignore_eos: bool = False) -> list[int]:
    """generate on one prompt alone, cut at the first EOS: what every engine must reproduce."""
    ids = torch.tensor([req.prompt_ids])
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=req.max_tokens, pad_token_id=loaded.eos_ids[0],
                                eos_token_id=None if ignore_eos else loaded.eos_ids)
    gen = out[0, ids.shape[1]:].tolist()
    if not ignore_eos:
        for k, t in enumerate(gen):
            if t in loaded.eos_ids:
                return gen[:k]
    return gen


def _run(engine: ReferenceEngine, requests: list[Request]):
    got = {c.key: c for batch in engine.run(requests) for c in batch}
    assert sorted(got) == sorted(r.key for r in requests)  # every row exactly once
    return got


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_generate_one_at_a_time_tiny(arch, tmp_path, smollm2_dir):
    loaded = _load(make_tiny_model(tmp_path / arch, arch, smollm2_dir, seed=3))
    reqs = _requests(loaded.tokenizer, [9, 4, 12, 1, 7, 10, 5])
    got = _run(ReferenceEngine(loaded, SamplingParams(), batch_size=3), reqs)
    for r in reqs:
        assert got[r.key].token_ids == _oracle(loaded, r), f"row {r.key} differs"
        assert len(got[r.key].token_ids) <= r.max_tokens


def test_ignore_eos_runs_exactly_max_tokens(tiny_model_dir):
    loaded = _load(tiny_model_dir)
    reqs = _requests(loaded.tokenizer, [6, 3, 8, 2, 5, 4, 7])
    got = _run(ReferenceEngine(loaded, SamplingParams(ignore_eos=True), batch_size=4), reqs)
    for r in reqs:
        c = got[r.key]
        assert len(c.token_ids) == r.max_tokens and c.finish_reason == "length"
        assert c.token_ids == _oracle(loaded, r, ignore_eos=True)


@pytest.mark.slow
def test_greedy_equals_generate_one_at_a_time_smollm2(smollm2_dir):
    loaded = _load(smollm2_dir)
    tok = loaded.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    reqs = [Request(key=i, prompt_ids=p, max_tokens=16) for i, p in enumerate(ids)]
    got = _run(ReferenceEngine(loaded, SamplingParams(), batch_size=4), reqs)
    for r in reqs:
        assert got[r.key].token_ids == _oracle(loaded, r), f"row {r.key} differs"
    # The real model answers the question (it really ran).
    assert "Paris" in got[5].text


def test_stop_string_cuts_text_and_tokens(tiny_model_dir):
    loaded = _load(tiny_model_dir)
    req = _requests(loaded.tokenizer, [16] * len(PROMPTS))[0]
    free = _run(ReferenceEngine(loaded, SamplingParams(ignore_eos=True)), [req])[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"choose a visible stop string from {text!r}"
    got = _run(ReferenceEngine(loaded, SamplingParams(stop=(stop,), ignore_eos=True)), [req])[0]
    assert got.finish_reason == "stop"
    assert got.text == text[: text.find(stop)]
    k = len(got.token_ids)
    assert got.token_ids == free.token_ids[:k]
    decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert stop in decode(got.token_ids) and stop not in decode(got.token_ids[:-1])


def test_sampling_is_per_row_and_independent_of_batch(tiny_model_dir):
    loaded = _load(tiny_model_dir)
    params = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, ignore_eos=True)
    reqs = _requests(loaded.tokenizer, [8] * len(PROMPTS), seed=11)
    together = _run(ReferenceEngine(loaded, params, batch_size=7), reqs)
    alone = {r.key: _run(ReferenceEngine(loaded, params, batch_size=1), [r])[r.key] for r in reqs[:3]}
    reordered = _run(ReferenceEngine(loaded, params, batch_size=2), list(reversed(reqs)))
    for i in range(3):
        assert together[i].token_ids == alone[i].token_ids == reordered[i].token_ids
    other_seed = _run(ReferenceEngine(loaded, params, batch_size=7), _requests(loaded.tokenizer, [8] * 7, seed=12))
    assert any(other_seed[i].token_ids != together[i].token_ids for i in range(7))
    greedy = _run(ReferenceEngine(loaded, SamplingParams(ignore_eos=True), batch_size=7), reqs)
    assert any(greedy[i].token_ids != together[i].token_ids for i in range(7))


def test_sampling_probs_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p[0, :2].sum(), torch.tensor(1.0))
    full = logits.softmax(-1)[0]
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-4))
    assert (p[0, 2:] == 0).all() and p[0, 1] > 0  # the first token alone is just short of top_p
    p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_row_seed_depends_on_job_seed_and_row_id_only():
    assert row_seed(0, "a") == row_seed(0, "a")
    assert len({row_seed(0, "a"), row_seed(1, "a"), row_seed(0, "b"), row_seed(0, 1), row_seed(0, "1")}) == 5
    assert 0 <= row_seed(2**62, "x") < 2**63
