"""BatchPrompt (arXiv 2309.00384, ``../shared/PAPERS.md``): several items per prompt, rounds with the items
permuted, a vote per item, SEAS early stopping, position calibration. Plain logic, numpy only: the engine
answers the prompts, this module says which prompts to ask and what the answers add up to.

One round: the active items, permuted (round 0 in input order unless ``shuffle_first``; later rounds a
seeded shuffle per round), cut into prompts of ``items_per_prompt``. Each answer is one item's label
log-probabilities at its slot (or None: no valid answer). After a round:

- **Calibration** (``calibrate``): a slot's position biases the answer (a small model repeats the previous
  label, so late slots are weaker). Each answer's log-probabilities have the mean log-probabilities of every
  answer at the same position subtracted, then are normalized again. No labels are needed.
- **Votes**: each valid answer votes for its most likely label, with weight 1, or (``weights: confidence``)
  1 when its margin (top probability minus the next) is at least ``confidence`` and 0.2 otherwise (the
  paper's self-weighting). Ties go to the label with the larger summed log-probability.
- **SEAS** (``seas``): an item leaves the later rounds when its last two answers agree and both were
  confident.

An item with no valid answer in any round needs a single-item prompt (``needs_fallback``); its answer is
added with ``add_fallback`` and the item is flagged.

Free answers (no label set: the list layout's short answers, ``OpenBallot``): each valid answer (a text)
votes 1 for itself, ties go to the answer given first, SEAS settles an item whose last two answers agree; no
calibration, no confidence weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOW_WEIGHT = 0.2  # a vote that is not confident (the paper's self-weighted ensembling)


@dataclass(frozen=True)
class BatchPromptConfig:
    items_per_prompt: int = 8
    rounds: int = 3
    shuffle_first: bool = False  # round 0 keeps the input order unless this is set
    seed: int = 0
    weights: str = "confidence"  # "confidence" or "equal"
    seas: bool = True
    confidence: float = 0.6  # the probability margin that makes an answer confident
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.items_per_prompt < 1 or self.rounds < 1:
            raise ValueError("items_per_prompt and rounds must be at least 1")
        if self.weights not in ("confidence", "equal"):
            raise ValueError(f"weights must be 'confidence' or 'equal', not {self.weights!r}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError("confidence is a probability margin between 0 and 1")


def round_prompts(items: Sequence[int], cfg: BatchPromptConfig, round_no: int) -> list[list[int]]:
    """The prompts of round ``round_no`` over the active ``items`` (ids, in input order): each a list of at
    most ``items_per_prompt`` item ids, in slot order. The same (items, config, round) always gives the same
    prompts."""
    order = list(items)
    if round_no > 0 or cfg.shuffle_first:
        rng = np.random.default_rng([cfg.seed, round_no])
        order = [order[i] for i in rng.permutation(len(order))]
    k = cfg.items_per_prompt
    return [order[i : i + k] for i in range(0, len(order), k)]


@dataclass(frozen=True)
class Answer:
    """One item's answer at one slot: its label log-probabilities (None: no valid answer there)."""

    item: int
    round: int
    prompt: int  # the prompt's index in its round
    position: int  # the slot, 0-based
    logprobs: np.ndarray | None  # [labels]
    text: str | None = None  # (free answers: the answer; logprobs is then None)


@dataclass
class ItemResult:
    label: str | None  # None: no valid answer at all
    votes: dict[str, float]  # weighted votes per label
    probs: dict[str, float]  # mean (calibrated) probability per label over the item's answers
    confidence: float  # the chosen label's mean probability
    rounds: int  # rounds the item took part in
    prompts: list[tuple[int, int]]  # (round, prompt) it appeared in
    fallback: bool  # answered by a single-item prompt


class _Rounds:
    """What both ballots do alike: which items go on, which need a fallback, where an item was asked."""

    cfg: BatchPromptConfig
    _answers: dict[int, list[Answer]]
    _fallback: dict[int, Any]

    def active(self, items: Sequence[int]) -> list[int]:
        """The items that go on to the next round (SEAS: not those whose last two answers agree and were
        both confident)."""
        if not self.cfg.seas:
            return list(items)
        return [i for i in items if not self._settled(i)]

    def needs_fallback(self, items: Sequence[int]) -> list[int]:
        """The items without a single valid answer (and no fallback answer yet)."""
        return [i for i in items if i not in self._fallback and not self._valid(i)]

    def _asked(self, item: int) -> tuple[list[tuple[int, int]], int]:
        """The (round, prompt) pairs ``item`` was asked in, and how many rounds."""
        answers = self._answers.get(item, [])
        return sorted({(a.round, a.prompt) for a in answers}), len({a.round for a in answers})

    def _valid(self, item: int) -> list[Answer]:
        raise NotImplementedError

    def _settled(self, item: int) -> bool:
        raise NotImplementedError


@dataclass
class Ballot(_Rounds):
    """The answers of every round so far, and what they add up to."""

    labels: Sequence[str]
    cfg: BatchPromptConfig
    _answers: dict[int, list[Answer]] = field(default_factory=dict)  # item -> its answers, in round order
    _fallback: dict[int, np.ndarray | None] = field(default_factory=dict)
    _means: dict[int, np.ndarray] | None = None  # (calibration: kept until answers are added)

    def add(self, answers: Iterable[Answer]) -> None:
        for a in answers:
            if a.logprobs is not None and len(a.logprobs) != len(self.labels):
                raise ValueError(f"item {a.item}: {len(a.logprobs)} log-probabilities for {len(self.labels)} labels")
            self._answers.setdefault(a.item, []).append(a)
        self._means = None

    def add_fallback(self, item: int, logprobs: np.ndarray | None) -> None:
        """The answer of a single-item prompt for an item without a valid answer (None: it had none either)."""
        self._fallback[item] = None if logprobs is None else np.asarray(logprobs, dtype=np.float64)

    def result(self, item: int) -> ItemResult:
        prompts, rounds = self._asked(item)
        if item in self._fallback:
            lp = self._fallback[item]
            return self._result([] if lp is None else [_softmax(lp)], [1.0], prompts, rounds, fallback=True)
        valid = self._valid(item)
        probs = [self._probs(a) for a in valid]
        weights = [self._weight(p) for p in probs]
        return self._result(probs, weights, prompts, rounds, fallback=False)

    # -- the parts ------------------------------------------------------------------------------------------

    def _valid(self, item: int) -> list[Answer]:
        return [a for a in self._answers.get(item, []) if a.logprobs is not None]

    def _position_means(self) -> dict[int, np.ndarray]:
        """Each slot position's mean log-probabilities over every valid answer at that position."""
        if self._means is not None:
            return self._means
        sums: dict[int, list] = {}
        for answers in self._answers.values():
            for a in answers:
                if a.logprobs is not None:
                    entry = sums.setdefault(a.position, [np.zeros(len(self.labels)), 0])
                    entry[0] += _log_softmax(a.logprobs)
                    entry[1] += 1
        self._means = {p: total / n for p, (total, n) in sums.items()}
        return self._means

    def _probs(self, a: Answer) -> np.ndarray:
        """An answer's label probabilities, calibrated for its position if asked for."""
        lp = _log_softmax(a.logprobs)
        if self.cfg.calibrate:
            lp = lp - self._position_means()[a.position]
        return _softmax(lp)

    def _weight(self, probs: np.ndarray) -> float:
        if self.cfg.weights == "equal":
            return 1.0
        return 1.0 if _margin(probs) >= self.cfg.confidence else LOW_WEIGHT

    def _settled(self, item: int) -> bool:
        """Its answers in its last two rounds are valid, agree, and were both confident."""
        recent = self._answers.get(item, [])[-2:]
        if len(recent) < 2 or any(a.logprobs is None for a in recent):
            return False
        last = [self._probs(a) for a in recent]
        same = int(np.argmax(last[0])) == int(np.argmax(last[1]))
        return same and all(_margin(p) >= self.cfg.confidence for p in last)

    def _result(self, probs: list[np.ndarray], weights: list[float], prompts: list, rounds: int,
                fallback: bool) -> ItemResult:
        labels = list(self.labels)
        if not probs:
            return ItemResult(None, dict.fromkeys(labels, 0.0), dict.fromkeys(labels, 0.0), 0.0, rounds, prompts,
                              fallback)
        votes = np.zeros(len(labels))
        for p, w in zip(probs, weights):
            votes[int(np.argmax(p))] += w
        summed = np.sum(np.log(np.maximum(probs, 1e-300)), axis=0)
        best = max(range(len(labels)), key=lambda j: (round(votes[j], 9), summed[j]))
        mean = np.mean(probs, axis=0)
        return ItemResult(labels[best], {lab: float(v) for lab, v in zip(labels, votes)},
                          {lab: float(v) for lab, v in zip(labels, mean)}, float(mean[best]), rounds, prompts,
                          fallback)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _margin(probs: np.ndarray) -> float:
    top = np.sort(probs)[::-1]
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


@dataclass
class Outcome:
    results: dict[int, ItemResult]
    prompts: list[int]  # prompts asked in each round
    fallback_prompts: int  # single-item prompts for items without a valid answer


@dataclass
class OpenBallot(_Rounds):
    """The answers of every round so far, for free answers (texts; ``Ballot``'s interface)."""

    cfg: BatchPromptConfig
    _answers: dict[int, list[Answer]] = field(default_factory=dict)
    _fallback: dict[int, str | None] = field(default_factory=dict)

    def add(self, answers: Iterable[Answer]) -> None:
        for a in answers:
            self._answers.setdefault(a.item, []).append(a)

    def add_fallback(self, item: int, text: str | None) -> None:
        self._fallback[item] = text

    def result(self, item: int) -> ItemResult:
        prompts, rounds = self._asked(item)
        fallback = item in self._fallback
        texts = [self._fallback[item]] if fallback else [a.text for a in self._valid(item)]
        texts = [t for t in texts if t]
        if not texts:
            return ItemResult(None, {}, {}, 0.0, rounds, prompts, fallback)
        votes: dict[str, float] = {}
        for t in texts:  # (in the order given: the first answer wins a tie)
            votes[t] = votes.get(t, 0.0) + 1.0
        best = max(votes, key=lambda t: votes[t])
        probs = {t: v / len(texts) for t, v in votes.items()}
        return ItemResult(best, votes, probs, probs[best], rounds, prompts, fallback)

    def _valid(self, item: int) -> list[Answer]:
        return [a for a in self._answers.get(item, []) if a.text]

    def _settled(self, item: int) -> bool:
        recent = self._answers.get(item, [])[-2:]
        return len(recent) == 2 and all(a.text for a in recent) and recent[0].text == recent[1].text


def _answer(item: int, round_no: int, prompt: int, position: int, value: Any) -> Answer:
    if value is None or isinstance(value, str):
        return Answer(item, round_no, prompt, position, None, value or None)
    return Answer(item, round_no, prompt, position, np.asarray(value, dtype=np.float64))


def run(items: Sequence[int], labels: Sequence[str] | None, cfg: BatchPromptConfig,
        ask: Callable[[list[list[int]]], Sequence], ask_one: Callable[[int], Sequence[float]] | None) -> Outcome:
    """Every round: the prompts of the active items go to ``ask`` (a list of prompts, each a list of item ids
    in slot order; it returns, per prompt, each slot's label log-probabilities or None); then the items
    without a valid answer go one at a time to ``ask_one`` (an item id; its label log-probabilities). Without
    ``labels`` (free answers) each answer is a text (or None)."""
    ballot: Ballot | OpenBallot = Ballot(labels, cfg) if labels is not None else OpenBallot(cfg)
    active, asked = list(items), []
    for r in range(cfg.rounds):
        if not active:
            break
        prompts = round_prompts(active, cfg, r)
        replies = ask(prompts)
        if len(replies) != len(prompts):
            raise ValueError(f"round {r}: {len(replies)} replies for {len(prompts)} prompts")
        ballot.add(_answer(item, r, p, pos, value) for p, (prompt, reply) in enumerate(zip(prompts, replies))
                   for pos, (item, value) in enumerate(zip(prompt, _slots(reply, len(prompt)))))
        asked.append(len(prompts))
        active = ballot.active(active)
    missing = ballot.needs_fallback(items)
    for item in missing:
        ballot.add_fallback(item, ask_one(item))
    return Outcome({i: ballot.result(i) for i in items}, asked, len(missing))


def _slots(reply: Sequence | None, k: int) -> list:
    """A prompt's reply cut or padded to its ``k`` slots (a missing answer is None)."""
    reply = list(reply or [])[:k]
    return reply + [None] * (k - len(reply))
