"""BatchPrompt's logic (``plan/batchprompt.py``) against a scripted fake model: permutations, votes and their
weights, ties, SEAS, position calibration, fallback for items without a valid answer, malformed replies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchrun.plan.batchprompt import Answer, Ballot, BatchPromptConfig, round_prompts, run

LABELS = ("negative", "positive")


def lp(p_positive: float) -> list[float]:
    """Label log-probabilities with P(positive) = p_positive."""
    return [math.log(1 - p_positive), math.log(p_positive)]


SURE_POS, SURE_NEG, UNSURE_POS, UNSURE_NEG = lp(0.95), lp(0.05), lp(0.6), lp(0.4)


def test_rounds_permute_every_active_item_once_and_repeat_exactly():
    cfg = BatchPromptConfig(items_per_prompt=4, rounds=3, seed=7)
    items = list(range(10))
    first = round_prompts(items, cfg, 0)
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # round 0 keeps the input order
    second = round_prompts(items, cfg, 1)
    assert sorted(i for p in second for i in p) == items and [len(p) for p in second] == [4, 4, 2]
    assert second != first and second == round_prompts(items, cfg, 1)
    assert round_prompts(items, BatchPromptConfig(items_per_prompt=4, seed=8), 1) != second
    shuffled = round_prompts(items, BatchPromptConfig(items_per_prompt=4, seed=7, shuffle_first=True), 0)
    assert shuffled != first and sorted(i for p in shuffled for i in p) == items


def _script(answers: dict[int, list]):
    """A fake model: item -> its answer in each round it is asked (log-probabilities, or None)."""
    seen: dict[int, int] = {}
    log: list[list[list[int]]] = []

    def ask(prompts):
        log.append(prompts)
        out = []
        for prompt in prompts:
            reply = []
            for item in prompt:
                k = seen.get(item, 0)
                seen[item] = k + 1
                reply.append(answers[item][k])
            out.append(reply)
        return out

    return ask, log


def test_majority_vote_and_confidence_weights():
    answers = {0: [SURE_POS, UNSURE_NEG, UNSURE_NEG],  # one confident vote (1) against two unsure (0.2 each)
               1: [SURE_NEG, SURE_NEG, SURE_POS],
               2: [UNSURE_POS, UNSURE_POS, SURE_NEG]}
    cfg = BatchPromptConfig(items_per_prompt=2, rounds=3, seas=False, calibrate=False)
    ask, log = _script(answers)
    out = run([0, 1, 2], LABELS, cfg, ask, ask_one=None)
    assert {i: r.label for i, r in out.results.items()} == {0: "positive", 1: "negative", 2: "negative"}
    assert out.results[0].votes == pytest.approx({"negative": 0.4, "positive": 1.0})
    assert out.results[1].rounds == 3 and len(out.results[1].prompts) == 3
    assert out.prompts == [2, 2, 2] and out.fallback_prompts == 0
    ask, _ = _script(answers)
    equal = run([0, 1, 2], LABELS, BatchPromptConfig(items_per_prompt=2, rounds=3, seas=False, calibrate=False,
                                                     weights="equal"), ask, None)
    assert {i: r.label for i, r in equal.results.items()} == {0: "negative", 1: "negative", 2: "positive"}


def test_a_tie_goes_to_the_larger_summed_log_probability():
    ask, _ = _script({0: [lp(0.9), lp(0.2)]})  # one vote each; positive's 0.9 outweighs negative's 0.8
    out = run([0], LABELS, BatchPromptConfig(rounds=2, seas=False, calibrate=False, weights="equal"), ask, None)
    assert out.results[0].votes == {"negative": 1.0, "positive": 1.0}
    assert out.results[0].label == "positive"
    assert out.results[0].probs == pytest.approx({"negative": 0.45, "positive": 0.55})


def test_seas_stops_items_with_two_agreeing_confident_answers():
    answers = {0: [SURE_POS, SURE_POS], 1: [SURE_NEG, UNSURE_NEG, SURE_NEG, SURE_NEG],
               2: [SURE_POS, SURE_NEG, SURE_NEG], 3: [None, SURE_POS, SURE_POS]}
    cfg = BatchPromptConfig(items_per_prompt=2, rounds=5, calibrate=False)
    ask, log = _script(answers)
    out = run([0, 1, 2, 3], LABELS, cfg, ask, None)
    asked = [sorted(i for p in prompts for i in p) for prompts in log]
    # After round 1: 0 settled. After round 2: 2 and 3 settled (3's first answer was missing). After round 3: 1.
    assert asked == [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3], [1]]
    assert out.prompts == [2, 2, 2, 1]
    assert {i: r.rounds for i, r in out.results.items()} == {0: 2, 1: 4, 2: 3, 3: 3}
    assert {i: r.label for i, r in out.results.items()} == {0: "positive", 1: "negative", 2: "negative",
                                                            3: "positive"}


def test_position_calibration_removes_a_slot_bias():
    """The fake model leans to "positive" in slot 1 (log-odds +2): uncalibrated, every negative item answered
    there is wrong; calibrated (each slot's mean log-odds subtracted), every item is right."""
    truth = {i: (i // 2) % 2 for i in range(8)}  # 1: positive; each slot sees both labels equally often
    bias = [0.0, 2.0]

    def ask(prompts):
        return [[[0.0, (1.5 if truth[item] else -1.5) + bias[pos]] for pos, item in enumerate(p)] for p in prompts]

    for calibrate, wrong in ((False, {1, 5}), (True, set())):  # (the negative items in slot 1)
        cfg = BatchPromptConfig(items_per_prompt=2, rounds=1, calibrate=calibrate, seas=False)
        out = run(list(range(8)), LABELS, cfg, ask, None)
        got = {i for i, r in out.results.items() if r.label != LABELS[truth[i]]}
        assert got == wrong, calibrate


def test_items_without_a_valid_answer_fall_back_to_one_item_prompts():
    answers = {0: [None, None], 1: [SURE_POS, SURE_POS], 2: [None, UNSURE_NEG]}
    ask, _ = _script(answers)
    asked_alone = []

    def ask_one(item):
        asked_alone.append(item)
        return SURE_NEG

    out = run([0, 1, 2], LABELS, BatchPromptConfig(items_per_prompt=3, rounds=2, calibrate=False), ask, ask_one)
    assert asked_alone == [0] and out.fallback_prompts == 1
    assert (out.results[0].label, out.results[0].fallback) == ("negative", True)
    assert (out.results[2].label, out.results[2].fallback) == ("negative", False)


def test_malformed_replies_short_long_and_wrong_widths():
    def ask(prompts):  # first prompt: one answer too many; second: one missing
        return [[SURE_POS] * (len(prompts[0]) + 1), [SURE_NEG] * (len(prompts[1]) - 1)]

    out = run(list(range(6)), LABELS, BatchPromptConfig(items_per_prompt=3, rounds=1, calibrate=False), ask,
              ask_one=lambda item: SURE_POS)
    assert [out.results[i].label for i in range(6)] == ["positive"] * 3 + ["negative", "negative", "positive"]
    assert [out.results[i].fallback for i in range(6)] == [False] * 5 + [True]
    with pytest.raises(ValueError, match="item 4: 3 log-probabilities for 2 labels"):
        Ballot(LABELS, BatchPromptConfig()).add([Answer(4, 0, 0, 0, np.zeros(3))])
    with pytest.raises(ValueError, match="round 0: 1 replies for 2 prompts"):
        run(list(range(6)), LABELS, BatchPromptConfig(items_per_prompt=3), lambda prompts: [[]], None)


@pytest.mark.parametrize("field, value, message", [("items_per_prompt", 0, "at least 1"), ("rounds", 0, "at least 1"),
                                                   ("weights", "votes", "weights must be"),
                                                   ("confidence", 1.5, "between 0 and 1")])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        BatchPromptConfig(**{field: value})


def _free_script(answers: dict[int, list]):
    """A fake model for free answers: item -> its answer text in each round it is asked (or None)."""
    return _script(answers)


def test_free_answers_vote_by_count_first_answer_wins_a_tie_and_seas_needs_two_equal_answers():
    answers = {0: ["red", "blue", "blue"], 1: ["red", "green", "blue"], 2: ["cat", "cat"], 3: [None, None, None]}
    ask, log = _free_script(answers)
    asked_one = []

    def ask_one(item):
        asked_one.append(item)
        return "dog"

    out = run(range(4), None, BatchPromptConfig(items_per_prompt=2, rounds=3, seed=3, calibrate=False), ask,
              ask_one)
    r = out.results
    assert (r[0].label, r[0].votes, r[0].confidence) == ("blue", {"red": 1.0, "blue": 2.0}, 2 / 3)
    assert r[1].label == "red" and r[1].votes == {"red": 1.0, "green": 1.0, "blue": 1.0}  # tie: the first given
    assert r[2].label == "cat" and r[2].rounds == 2  # settled after two equal answers (SEAS)
    assert (r[3].label, r[3].fallback, r[3].rounds) == ("dog", True, 3) and asked_one == [3]
    assert out.prompts == [2, 2, 2] and out.fallback_prompts == 1
    assert sorted(i for p in log[2] for i in p) == [0, 1, 3]


def test_a_fallback_without_an_answer_leaves_the_item_unlabelled():
    ask, _ = _script({0: [None], 1: [SURE_POS]})
    out = run(range(2), LABELS, BatchPromptConfig(items_per_prompt=2, rounds=1, calibrate=False), ask,
              lambda item: None)
    assert out.results[0].label is None and out.results[0].fallback and out.results[0].votes == {
        "negative": 0.0, "positive": 0.0}
    assert out.results[1].label == "positive" and not out.results[1].fallback
