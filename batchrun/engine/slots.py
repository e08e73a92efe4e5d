"""Label slots: BatchPrompt's inline layout as one constrained generation (no torch here).

A prompt holds several items; its output is, for each item, a label then the forced text of the next item:

    prompt = ... "Review 1: {item 1}\\nSentiment:"      (the first item's text ends the prompt)
    output = LABEL "\\nReview 2: {item 2}\\nSentiment:" LABEL ... LABEL EOS

Each label slot allows only the labels' tokens (single tokens each); every other position allows exactly one
token, the next of the forced text. The engines record the model's logits of the label tokens at every
slot (``score_ids``, then ``record``): the answers BatchPrompt votes with (``plan.batchprompt``). batchrun's engine
appends each forced text at once, as a chunk computed with the label just drawn (``forced_after``), so a
prompt of K items takes K decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence


class LabelSlots:
    """One prompt's constraint (``engine.requests.LogitsConstraint``): ``label_ids`` are the labels' tokens
    (one token each, distinct), ``between[n]`` the tokens forced after the label of item n (the next item's
    text; the last is usually empty), ``eos_ids`` what may end the output."""

    def __init__(self, label_ids: Sequence[int], between: Sequence[Sequence[int]], eos_ids: Sequence[int]):
        if len(set(label_ids)) != len(label_ids) or len(label_ids) < 2:
            raise ValueError("label slots need at least two distinct label tokens")
        self.label_ids = [int(t) for t in label_ids]
        self.eos_ids = [int(t) for t in eos_ids]
        self.slots: list[int] = []  # the output position of each label slot
        pos = 0
        self._forced: dict[int, list[int]] = {}  # output position -> the tokens forced from there on
        for text in between:
            self.slots.append(pos)
            pos += 1
            self._forced[pos] = [int(t) for t in text]
            pos += len(text)
        self.length = pos  # the output's length before EOS
        self.scores: dict[int, list[float]] = {}  # slot index -> the label tokens' logits there

    def _where(self, n: int) -> tuple[str, int]:
        """What output position ``n`` is: ("slot", its index), ("forced", the token), or ("end", 0)."""
        if n >= self.length:
            return "end", 0
        for i, start in enumerate(self.slots):
            if n == start:
                return "slot", i
            if n < start:
                break
        start = max(p for p in self._forced if p <= n)
        return "forced", self._forced[start][n - start]

    def allowed_tokens(self, generated: Sequence[int]) -> list[int]:
        kind, value = self._where(len(generated))
        if kind == "slot":
            return self.label_ids
        return [value] if kind == "forced" else self.eos_ids

    def forced_after(self, generated: Sequence[int]) -> list[int]:
        """The tokens forced right after ``generated`` (whose last token was just drawn): the text up to the
        next label slot, when it follows a label."""
        return list(self._forced.get(len(generated), [])) if len(generated) <= self.length else []

    def score_ids(self, generated: Sequence[int]) -> list[int] | None:
        """The tokens whose logits to record at the next position: the labels', at a slot."""
        return self.label_ids if self._where(len(generated))[0] == "slot" else None

    def record(self, position: int, logits: Sequence[float]) -> None:
        """The model's logits of ``label_ids`` at output position ``position`` (a slot)."""
        self.scores[self._where(position)[1]] = [float(x) for x in logits]

    def answers(self) -> list[list[float] | None]:
        """Each slot's label logits (None where the output ended before it)."""
        return [self.scores.get(i) for i in range(len(self.slots))]
