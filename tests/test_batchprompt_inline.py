"""BatchPrompt's inline layout end to end on a tiny model (``runtime/batchprompt.py``): the prompts, the
vote, the counts of prompts and tokens, and the labels' clear error."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.engine.batch import BatchEngine
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import SamplingParams
from batchrun.plan.batchprompt import BatchPromptConfig
from batchrun.runtime.batchprompt import InlineBatchPrompt, InlineLayout

ITEMS = ["Great battery.", "Broke after a day.", "Fine value.", "Terrible fit.", "Love the color.",
         "Arrived scratched.", "Works as described."]
LAYOUT = InlineLayout("Say whether each review is positive or negative.")


def _bp(tiny_fp32):
    return InlineBatchPrompt(BatchEngine(tiny_fp32, SamplingParams(), 100_000, 4, 64), tiny_fp32.tokenizer, LAYOUT,
                             ITEMS)


def test_one_round_labels_are_each_slots_argmax_as_the_reference_engine_sees_it(tiny_fp32):
    bp = _bp(tiny_fp32)
    out = bp.classify(BatchPromptConfig(items_per_prompt=len(ITEMS), rounds=1, calibrate=False, seas=False))
    req = bp.request(0, list(range(len(ITEMS))))
    list(ReferenceEngine(tiny_fp32, SamplingParams(), batch_size=1).run([req]))
    answers = req.constraint.answers()
    want = [LAYOUT.labels[int(np.argmax(a))] for a in answers]
    assert [out.results[i].label for i in range(len(ITEMS))] == want
    assert out.prompts == [1] and out.fallback_prompts == 0
    assert [out.results[i].prompts for i in range(len(ITEMS))] == [[(0, 0)]] * len(ITEMS)
    # Counts: one prompt, its tokens; the output is a label per item and the forced items between.
    u = bp.usage
    assert (u.prompts, u.prompt_tokens) == (1, len(req.prompt_ids))
    assert u.output_tokens == req.constraint.length  # every label and forced token (the EOS is not output)
    assert u.computed_tokens == u.prompt_tokens + u.output_tokens


def test_rounds_share_the_instruction_and_count_every_prompt(tiny_fp32):
    bp = _bp(tiny_fp32)
    out = bp.classify(BatchPromptConfig(items_per_prompt=3, rounds=3, seas=False, seed=4))
    assert out.prompts == [3, 3, 3] and bp.usage.prompts == 9
    assert all(len(r.prompts) == 3 and r.label in LAYOUT.labels for r in out.results.values())
    # The instruction and "Review 1:" are one shared prefix per round: computed once for its three prompts
    # (the items' first words all differ).
    a, b = bp.request(0, [0]).prompt_ids, bp.request(1, [1]).prompt_ids
    common = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common > len(bp.head)
    assert bp.usage.computed_tokens == bp.usage.prompt_tokens - 3 * 2 * common + bp.usage.output_tokens


def test_a_label_of_several_tokens_is_a_clear_error(tiny_fp32):
    layout = InlineLayout("x", labels=("positive", "somewhat unclear"))
    with pytest.raises(ValueError, match="label 'somewhat unclear' is 2 tokens"):
        InlineBatchPrompt(None, tiny_fp32.tokenizer, layout, ITEMS)
