"""The ``batchprompt`` section of a job spec (``mode: batchprompt``): several items per prompt, rounds with the
items permuted, a vote per item (``batchrun.plan.batchprompt``; ``../shared/PAPERS.md``, BatchPrompt).

Each input row is one item: ``prompt.template`` renders its text. A prompt is ``instruction`` and then, in one
of two layouts:

- ``inline`` (the default; small models): each item in turn, ``item_template`` ("Review {{ n }}: {{ item }}"
  then the answer cue), each followed by a slot where the model picks one of ``labels`` (constrained: an
  argmax over the labels' tokens), the chosen label kept in the text before the next item;
- ``list`` (the paper's layout; large models): every item listed first (``item_template``), then the answers
  one per line (``answer_template``, "{{ n }}:"), each constrained to ``labels``, or, without ``labels``, short
  free answers parsed from the output (at most ``answer_tokens`` tokens each).

``examples`` (few-shot) are shown in the same layout before the items. Pydantic is used here as in
``batchrun.spec``; this module knows nothing about how the mode runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Example(_Strict):
    """A few-shot example: an item's text and its answer."""

    item: str = Field(min_length=1)
    label: str = Field(min_length=1)


INLINE_ITEM = "Item {{ n }}: {{ item }}\nAnswer:"
LIST_ITEM = "Item {{ n }}: {{ item }}"


class BatchPromptSpec(_Strict):
    """``mode: batchprompt``'s settings (defaults: the best inline setting measured on SmolLM2, README)."""

    instruction: str = Field(min_length=1)
    labels: list[str] | None = Field(default=None, min_length=2, max_length=64)  # None: free answers (list)
    layout: Literal["inline", "list"] = "inline"
    items_per_prompt: int = Field(default=4, ge=1, le=256, strict=True)
    rounds: int = Field(default=5, ge=1, le=64, strict=True)
    shuffle_first: bool = Field(default=False, strict=True)  # round 0 keeps the input order unless set
    seed: int = Field(default=0, ge=0, lt=2**63, strict=True)
    weights: Literal["confidence", "equal"] = "confidence"
    seas: bool = Field(default=True, strict=True)
    confidence: float = Field(default=0.6, ge=0, le=1, allow_inf_nan=False)
    calibrate: bool | None = Field(default=None, strict=True)  # None: on with labels, off for free answers
    item_template: str | None = Field(default=None, min_length=1)  # None: INLINE_ITEM / LIST_ITEM
    answer_template: str = Field(default="{{ n }}:", min_length=1)  # (list layout)
    label_prefix: str = " "  # what comes between the cue and a label (labels are one token after it)
    answer_tokens: int = Field(default=8, ge=1, le=256, strict=True)  # (list layout, free answers)
    examples: list[Example] = Field(default_factory=list, max_length=64)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if any(not s.strip() for s in v):
                raise ValueError("a label is empty")
            if len(set(v)) != len(v):
                raise ValueError("labels must be distinct")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BatchPromptSpec:
        if self.labels is None:
            if self.layout == "inline":
                raise ValueError("the inline layout needs labels (a closed label set); free answers need "
                                 "layout: list")
            if self.calibrate:
                raise ValueError("calibrate needs labels (it works on the labels' probabilities)")
        elif self.examples:
            bad = [e.label for e in self.examples if e.label not in self.labels]
            if bad:
                raise ValueError(f"example label {bad[0]!r} is not one of the labels {self.labels}")
        return self

    @property
    def calibrated(self) -> bool:
        return self.labels is not None if self.calibrate is None else self.calibrate

    @property
    def item_text(self) -> str:
        return self.item_template or (INLINE_ITEM if self.layout == "inline" else LIST_ITEM)
