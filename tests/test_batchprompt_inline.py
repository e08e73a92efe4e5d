"""BatchPrompt's layouts end to end on a tiny model (``runtime/batchprompt.py``): the prompts, the vote,
the counts of prompts and tokens, examples, the list layout (labels and free answers), the labels' clear
error."""

from __future__ import annotations

import numpy as np
import pytest

from batchrun.engine.batch import BatchEngine
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import SamplingParams
from batchrun.errors import SpecError
from batchrun.plan.batchprompt import BatchPromptConfig
from batchrun.runtime.batchprompt import BatchPrompter, Layout, Prompter, parse_answers

ITEMS = ["Great battery.", "Broke after a day.", "Fine value.", "Terrible fit.", "Love the color.",
         "Arrived scratched.", "Works as described."]
LAYOUT = Layout("Say whether each review is positive or negative.")


def _bp(tiny_fp32, layout=LAYOUT):
    return BatchPrompter(BatchEngine(tiny_fp32, SamplingParams(), 100_000, 4, 64),
                         Prompter(tiny_fp32.tokenizer, layout, ITEMS))


def test_one_round_labels_are_each_slots_argmax_as_the_reference_engine_sees_it(tiny_fp32):
    bp = _bp(tiny_fp32)
    out = bp.classify(BatchPromptConfig(items_per_prompt=len(ITEMS), rounds=1, calibrate=False, seas=False))
    req = bp.prompter.request(0, list(range(len(ITEMS))))
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
    a, b = bp.prompter.request(0, [0]).prompt_ids, bp.prompter.request(1, [1]).prompt_ids
    common = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common > len(bp.prompter.head)
    assert bp.usage.computed_tokens == bp.usage.prompt_tokens - 3 * 2 * common + bp.usage.output_tokens


def test_a_label_of_several_tokens_is_a_clear_error(tiny_fp32):
    layout = Layout("x", labels=("positive", "somewhat unclear"))
    with pytest.raises(SpecError, match=r"batchprompt\.labels: label 'somewhat unclear' is 2 tokens"):
        Prompter(tiny_fp32.tokenizer, layout, ITEMS)


def test_examples_come_first_with_their_labels_and_the_items_are_numbered_after_them(tiny_fp32):
    tok = tiny_fp32.tokenizer
    layout = Layout("Label the reviews.", examples=(("Nice.", "positive"), ("Bad.", "negative")))
    p = Prompter(tok, layout, ITEMS)
    req = p.request(0, [0, 1])
    text = tok.decode(req.prompt_ids)
    assert text.endswith("Review 1: Nice.\nSentiment: positive\nReview 2: Bad.\nSentiment: negative\n"
                         "Review 3: Great battery.\nSentiment:")
    assert tok.decode(req.constraint._forced[1]) == "\nReview 4: Broke after a day.\nSentiment:"


def test_list_layout_lists_every_item_then_answers_each_index_in_a_label_slot(tiny_fp32):
    layout = Layout("Label each review.", kind="list", item_template="Review {{ n }}: {{ item }}")
    bp = _bp(tiny_fp32, layout)
    out = bp.classify(BatchPromptConfig(items_per_prompt=3, rounds=1, calibrate=False, seas=False))
    req = bp.prompter.request(0, [0, 1, 2])
    text = tiny_fp32.tokenizer.decode(req.prompt_ids)
    assert "Label each review.\n\nReview 1: Great battery.\nReview 2: Broke after a day.\nReview 3: Fine value." \
        in text and text.endswith("1:")
    assert [tiny_fp32.tokenizer.decode(req.constraint._forced[s + 1]) for s in req.constraint.slots[:2]] == [
        "\n2:", "\n3:"]
    list(ReferenceEngine(tiny_fp32, SamplingParams(), batch_size=1).run([req]))
    want = [LAYOUT.labels[int(np.argmax(a))] for a in req.constraint.answers()]
    assert [out.results[i].label for i in range(3)] == want


def test_free_answers_are_parsed_line_by_line():
    text = "1: Red\n2. blue.\nItem 3: \"Green\"\n3: ignored, a second answer\n7: out of range\nnoise"
    assert parse_answers(text, 4, 8) == ["red", "blue", "green", None]
    assert parse_answers("Purple", 1, 8) == ["purple"]  # one item: its number may be left out
    assert parse_answers("", 2, 8) == [None, None]


def test_free_answers_run_through_the_engine_and_every_item_gets_a_row(tiny_fp32):
    layout = Layout("Name the colour.", labels=None, kind="list", answer_tokens=3)
    bp = _bp(tiny_fp32, layout)
    out = bp.classify(BatchPromptConfig(items_per_prompt=4, rounds=2, calibrate=False, seas=False))
    assert sorted(out.results) == list(range(len(ITEMS)))
    req = bp.prompter.request(0, [0, 1, 2, 3])
    assert req.constraint is None and req.max_tokens == 4 * (3 + 4)
    for r in out.results.values():  # (a random model: answers or fallbacks, never a crash)
        assert r.label is None or (r.label == r.label.strip().lower() and r.votes[r.label] >= 1)


def test_a_free_answer_longer_than_answer_tokens_is_no_answer(tiny_fp32):
    tok = tiny_fp32.tokenizer
    long = "it is a rather long answer that goes on"
    assert parse_answers(f"1: {long}\n2: short", 2, 2, tok) == [None, "short"]
    assert parse_answers(long, 1, 2, tok) == [None] and parse_answers(long, 1, 20, tok) == [long]
