"""BatchPrompt's inline layout as one constrained generation (``engine/slots.py``): several items per prompt,
a label slot after each, the next item's text forced between. batchrun's engine appends each forced text as
one chunk (a prompt of K items in K decode steps) and must equal the reference engine token for token, and
record the same label logits at every slot, equal to a plain forward pass over the whole output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchrun.engine.batch import BatchEngine
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Request, SamplingParams
from batchrun.engine.slots import LabelSlots
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.tokens import TokenTable

ITEMS = [["Great battery, works well.", "Broke after a day.", "Fine value for the money."],
         ["Terrible fit.", "I love the color."],
         ["Arrived late and scratched.", "Exactly as described, happy.", "Meh.", "Would buy again!"]]


def _prompts(tok):
    """Each prompt: the instruction and the first item; the slots' forced texts: the following items."""
    labels = [tok.encode(" positive", add_special_tokens=False), tok.encode(" negative", add_special_tokens=False)]
    assert all(len(x) == 1 for x in labels)
    label_ids = [x[0] for x in labels]
    out = []
    for items in ITEMS:
        head = "Classify each review.\nReview 1: " + items[0] + "\nSentiment:"
        between = [tok.encode(f"\nReview {n + 2}: {text}\nSentiment:", add_special_tokens=False)
                   for n, text in enumerate(items[1:])] + [[]]
        out.append((tok.encode(head, add_special_tokens=False), label_ids, between))
    return out


def _requests(tok):
    eos = [tok.eos_token_id]
    return [Request(key=i, prompt_ids=p, max_tokens=sum(map(len, between)) + len(between) + 1,
                    constraint=LabelSlots(labels, between, eos))
            for i, (p, labels, between) in enumerate(_prompts(tok))]


def test_label_slots_equal_the_reference_engine_and_a_plain_forward(tiny_fp32):
    tok = tiny_fp32.tokenizer
    reqs = _requests(tok)
    plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))
    engine = BatchEngine(tiny_fp32, SamplingParams(), 100_000, 4, 64)
    got = {c.key: c for batch in engine.run(reqs, plan) for c in batch}
    ref_reqs = _requests(tok)
    want = {c.key: c for batch in ReferenceEngine(tiny_fp32, SamplingParams(), batch_size=2).run(ref_reqs)
            for c in batch}
    # K decode steps per prompt (the forced texts are chunks), after the prompts' prefill.
    assert engine.stats["steps"] <= 2 + max(len(items) for items in ITEMS)
    for r, ref in zip(reqs, ref_reqs):
        slots = r.constraint
        assert got[r.key].token_ids == want[r.key].token_ids, f"row {r.key}"
        assert got[r.key].finish_reason == "stop"
        n = len(slots.slots)
        labels = [got[r.key].token_ids[p] for p in slots.slots]
        assert all(t in slots.label_ids for t in labels)
        # The forced texts are exactly there, between the labels.
        between = _prompts(tok)[r.key][2]
        forced = [t for j, t in enumerate(got[r.key].token_ids) if j not in slots.slots]
        assert forced == [t for x in between for t in x]
        answers = slots.answers()
        assert len(answers) == n and all(a is not None for a in answers)
        np.testing.assert_allclose(answers, ref.constraint.answers(), rtol=1e-4, atol=1e-4)
        # A plain forward pass over prompt + output gives the same label logits at each slot.
        ids = torch.tensor([r.prompt_ids + got[r.key].token_ids])
        with torch.no_grad():
            logits = tiny_fp32.model(input_ids=ids).logits[0]
        start = len(r.prompt_ids) - 1
        plain = [logits[start + p, slots.label_ids].tolist() for p in slots.slots]
        np.testing.assert_allclose(answers, plain, rtol=1e-4, atol=1e-4)
        # Each label is the argmax of its slot's label logits (greedy).
        assert labels == [slots.label_ids[int(np.argmax(a))] for a in answers]


def test_label_slots_positions_and_errors():
    s = LabelSlots([7, 8], [[1, 2], [3], []], [0])
    assert s.slots == [0, 3, 5] and s.length == 6
    assert [s.allowed_tokens([9] * n) for n in range(7)] == [[7, 8], [1], [2], [7, 8], [3], [7, 8], [0]]
    assert [s.forced_after([9] * n) for n in range(1, 7)] == [[1, 2], [], [], [3], [], []]
    assert [s.score_ids([9] * n) for n in range(7)] == [[7, 8], None, None, [7, 8], None, [7, 8], None]
    s.record(3, [0.5, 1.5])
    assert s.answers() == [None, [0.5, 1.5], None]
    with pytest.raises(ValueError, match="two distinct label tokens"):
        LabelSlots([7, 7], [[]], [0])
