"""BatchPrompt's inline layout on a loaded model: prompts of several items, each followed by a label slot,
answered by batchrun's engine and voted on by ``plan.batchprompt`` (no torch here).

A prompt is the instruction (alone in the user turn: the same for every prompt, so one shared prefix for
the whole job) and, in the assistant's turn, the first item ("Review 1: {item}\\nSentiment:"); the output is
a label, the next item's text (forced), a label, ... (``engine.slots.LabelSlots``). Labels must be one token
each after ``label_prefix`` (" positive" in SmolLM2's tokenizer): a label that is not is a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchrun.engine.requests import Request
from batchrun.engine.slots import LabelSlots
from batchrun.plan.batchprompt import BatchPromptConfig, Outcome, run
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.tokens import TokenTable


@dataclass(frozen=True)
class InlineLayout:
    instruction: str
    labels: tuple[str, ...] = ("positive", "negative")
    item_template: str = "Review {n}: {item}\nSentiment:"
    label_prefix: str = " "
    chat: bool = True  # the instruction in the model's chat template (user turn), items in the answer


def label_token_ids(tokenizer: Any, layout: InlineLayout) -> list[int]:
    ids = []
    for label in layout.labels:
        toks = tokenizer.encode(layout.label_prefix + label, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"label {label!r} is {len(toks)} tokens after {layout.label_prefix!r}; the inline layout "
                             "needs one token per label (choose other label words)")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError("two labels share a token")
    return ids


@dataclass
class Usage:
    prompts: int = 0
    prompt_tokens: int = 0  # the prompts' tokens, as sent
    computed_tokens: int = 0  # prompt tokens computed after prefix sharing, plus the outputs' tokens
    output_tokens: int = 0  # labels and forced item text


class InlineBatchPrompt:
    """Classify ``items`` (texts) with ``engine`` (batchrun's engine over a loaded model)."""

    def __init__(self, engine: Any, tokenizer: Any, layout: InlineLayout, items: Sequence[str]):
        self.engine, self.tok, self.layout, self.items = engine, tokenizer, layout, list(items)
        self.label_ids = label_token_ids(tokenizer, layout)
        self.eos = [tokenizer.eos_token_id]
        if layout.chat:
            head = tokenizer.apply_chat_template([{"role": "user", "content": layout.instruction}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            head = layout.instruction + "\n"
        self.head = tokenizer.encode(head, add_special_tokens=False)
        self.usage = Usage()

    def _item(self, n: int, item: int, first: bool) -> list[int]:
        text = self.layout.item_template.format(n=n, item=self.items[item])
        return self.tok.encode(text if first else "\n" + text, add_special_tokens=False)

    def request(self, key: int, slot_items: Sequence[int]) -> Request:
        prompt = self.head + self._item(1, slot_items[0], True)
        between = [self._item(n + 2, item, False) for n, item in enumerate(slot_items[1:])] + [[]]
        slots = LabelSlots(self.label_ids, between, self.eos)
        return Request(key=key, prompt_ids=prompt, max_tokens=slots.length + 1, constraint=slots)

    def ask(self, prompts: Sequence[Sequence[int]]) -> list[list]:
        """Each prompt's slot answers (the label tokens' logits), from one engine run over all of them."""
        reqs = [self.request(i, p) for i, p in enumerate(prompts)]
        plan = build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                          PlanConfig(step_tokens=self.engine.step_tokens, block_size=self.engine.block_size))
        done = {c.key: c for batch in self.engine.run(reqs, plan) for c in batch}
        u = self.usage
        u.prompts += len(reqs)
        u.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        out = sum(len(c.token_ids) for c in done.values())
        u.output_tokens += out
        u.computed_tokens += plan.stats()["unique_tokens"] + out
        return [r.constraint.answers() for r in reqs]

    def classify(self, cfg: BatchPromptConfig) -> Outcome:
        """Every item's vote (``plan.batchprompt.run``): rounds of prompts of ``cfg.items_per_prompt`` items,
        and single-item prompts for items without a valid answer."""
        return run(range(len(self.items)), self.layout.labels, cfg, self.ask,
                   lambda item: self.ask([[item]])[0][0])
