"""BatchPrompt's prompts and answers (``mode: batchprompt``): several items per prompt, answered by one of
batchrun's engines, voted on by ``plan.batchprompt`` (no torch here).

Two layouts (``spec_batchprompt``):

- **inline**: the instruction alone in the user turn (the same for every prompt: one shared prefix for the
  whole job), then, in the answer, the examples with their labels and the first item ("Review 1: {item}
  \\nSentiment:"); the output is a label slot, the next item's text (forced), a slot, ... (``LabelSlots``).
- **list**: the instruction and every item in the user turn, the answers in the assistant's turn: with labels
  "1:" slot "\\n2:" slot ... (``LabelSlots``, the cues forced); without labels, free text parsed line by line
  ("2: answer", "2. answer", "Item 2: answer").

Labels must be one token each after ``label_prefix`` (" positive" in SmolLM2's tokenizer): a label that is not
is a clear error. Templates are Jinja (``n``: the item's number in its prompt, ``item``: its text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchrun.engine.requests import Interrupted, Request
from batchrun.engine.slots import LabelSlots
from batchrun.errors import SpecError
from batchrun.io.prompts import compile_template
from batchrun.plan.batchprompt import BatchPromptConfig, Outcome, run
from batchrun.plan.plan import Plan, PlanConfig, build_plan
from batchrun.spec_batchprompt import BatchPromptSpec
from batchrun.tokens import TokenTable

_ANSWER_LINE = re.compile(r"^\s*(?:[A-Za-z][\w ]{0,20}?\s)?#?(\d{1,4})\s*[:.)\]-]\s*(.*?)\s*$")


@dataclass(frozen=True)
class Layout:
    """What a prompt looks like."""

    instruction: str
    labels: tuple[str, ...] | None = ("positive", "negative")  # None: free answers (list layout)
    kind: str = "inline"  # or "list"
    item_template: str = "Review {{ n }}: {{ item }}\nSentiment:"
    answer_template: str = "{{ n }}:"
    label_prefix: str = " "
    examples: tuple[tuple[str, str], ...] = ()  # (item, label)
    chat: bool = True  # the instruction in the model's chat template (user turn), answers in its reply
    system: str | None = None
    fewshot: tuple[tuple[str, str], ...] = ()  # chat turns (user, assistant) before the instruction
    answer_tokens: int = 8  # (free answers: at most this many tokens each)

    @classmethod
    def from_spec(cls, bp: BatchPromptSpec, chat: bool, system: str | None,
                  fewshot: Sequence[tuple[str, str]] = ()) -> Layout:
        return cls(bp.instruction, None if bp.labels is None else tuple(bp.labels), bp.layout, bp.item_text,
                   bp.answer_template, bp.label_prefix, tuple((e.item, e.label) for e in bp.examples), chat, system,
                   tuple(fewshot), bp.answer_tokens)


def config_of(bp: BatchPromptSpec) -> BatchPromptConfig:
    return BatchPromptConfig(items_per_prompt=bp.items_per_prompt, rounds=bp.rounds, shuffle_first=bp.shuffle_first,
                             seed=bp.seed, weights=bp.weights, seas=bp.seas, confidence=bp.confidence,
                             calibrate=bp.calibrated)


def label_token_ids(tokenizer: Any, layout: Layout) -> list[int]:
    ids = []
    for label in layout.labels or ():
        toks = tokenizer.encode(layout.label_prefix + label, add_special_tokens=False)
        if len(toks) != 1:
            raise SpecError(f"batchprompt.labels: label {label!r} is {len(toks)} tokens after "
                            f"{layout.label_prefix!r}; each label must be one token (choose other label words, "
                            "or another batchprompt.label_prefix)")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise SpecError("batchprompt.labels: two labels share a token")
    return ids


@dataclass
class Usage:
    prompts: int = 0
    prompt_tokens: int = 0  # the prompts' tokens, as sent
    computed_tokens: int = 0  # prompt tokens computed after prefix sharing, plus the outputs' tokens
    output_tokens: int = 0  # labels and forced item text (inline), the answers (list)

    def add(self, requests: Sequence[Request], plan: Plan, output_tokens: int) -> None:
        self.prompts += len(requests)
        self.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self.output_tokens += output_tokens
        self.computed_tokens += plan.stats()["unique_tokens"] + output_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
                "computed_tokens": self.computed_tokens, "output_tokens": self.output_tokens}


class Prompter:
    """The prompts of ``items`` (texts) in ``layout``, as engine requests (tokenizer only, no model)."""

    def __init__(self, tokenizer: Any, layout: Layout, items: Sequence[str]):
        self.tok, self.layout, self.items = tokenizer, layout, list(items)
        self.label_ids = label_token_ids(tokenizer, layout)
        self.eos = [tokenizer.eos_token_id]
        self._item_t = compile_template("batchprompt.item_template", layout.item_template)
        self._answer_t = compile_template("batchprompt.answer_template", layout.answer_template)
        self.shots = len(layout.examples)
        if layout.kind == "inline":
            shots = "".join(self._item(j + 1, text) + layout.label_prefix + label + "\n"
                            for j, (text, label) in enumerate(layout.examples))
            self.head = self._encode(self._turns(layout.instruction)) + self._encode(shots)
        else:
            self.head = []

    # -- text -----------------------------------------------------------------------------------------------

    def _item(self, n: int, text: str) -> str:
        return self._item_t.render(n=n, item=text)

    def _answer(self, n: int) -> str:
        return self._answer_t.render(n=n)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False) if text else []

    def _turns(self, user: str, exchange: tuple[str, str] | None = None) -> str:
        """The prompt's text up to the answer: system, an example exchange (list layout), the user turn."""
        lay = self.layout
        if lay.chat:
            messages = [{"role": "system", "content": lay.system}] if lay.system else []
            for user_turn, reply in lay.fewshot:
                messages += [{"role": "user", "content": user_turn}, {"role": "assistant", "content": reply}]
            if exchange:
                messages += [{"role": "user", "content": exchange[0]}, {"role": "assistant", "content": exchange[1]}]
            messages.append({"role": "user", "content": user})
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [lay.system] if lay.system else []
        if exchange:
            parts += list(exchange)
        return "\n\n".join([*parts, user]) + "\n"

    def _list_user(self, texts: Sequence[str]) -> str:
        return self.layout.instruction + "\n\n" + "\n".join(self._item(n + 1, t) for n, t in enumerate(texts))

    # -- requests -------------------------------------------------------------------------------------------

    def request(self, key: Any, slot_items: Sequence[int]) -> Request:
        """The prompt of ``slot_items`` (item ids, in slot order)."""
        if self.layout.kind == "inline":
            first = self.shots + 1
            prompt = self.head + self._encode(self._item(first, self.items[slot_items[0]]))
            between = [self._encode("\n" + self._item(first + n + 1, self.items[i]))
                       for n, i in enumerate(slot_items[1:])]
        else:
            exchange = None
            if self.layout.examples:
                shots = [t for t, _ in self.layout.examples]
                exchange = (self._list_user(shots), "\n".join(f"{self._answer(n + 1)}{self.layout.label_prefix}{lab}"
                                                              for n, (_, lab) in enumerate(self.layout.examples)))
            prompt = (self._encode(self._turns(self._list_user([self.items[i] for i in slot_items]), exchange))
                      + self._encode(self._answer(1)))
            if self.layout.labels is None:
                limit = len(slot_items) * (self.layout.answer_tokens + 4)
                return Request(key=key, prompt_ids=prompt, max_tokens=limit)
            between = [self._encode("\n" + self._answer(n + 2)) for n in range(len(slot_items) - 1)]
        slots = LabelSlots(self.label_ids, [*between, []], self.eos)
        return Request(key=key, prompt_ids=prompt, max_tokens=slots.length + 1, constraint=slots)

    def requests(self, prompts: Sequence[Sequence[int]]) -> list[Request]:
        return [self.request(i, p) for i, p in enumerate(prompts)]

    def answers(self, request: Request, token_ids: Sequence[int], k: int) -> list:
        """A finished prompt's answer per slot: label log-probabilities (labels), or text (free), or None."""
        if isinstance(request.constraint, LabelSlots):
            return request.constraint.answers()
        text = self._answer(1) + self.tok.decode(list(token_ids), skip_special_tokens=True)
        return parse_answers(text, k, self.layout.answer_tokens, self.tok)


def parse_answers(text: str, k: int, max_tokens: int, tokenizer: Any = None) -> list[str | None]:
    """Free answers from a list-layout output: the first answer given for each index 1..k ("2: x", "2. x",
    "Item 2: x"), normalised (stripped, surrounding quotes and a final full stop removed, lower case), at most
    ``max_tokens`` tokens long; None where an index has no answer."""
    def short(answer: str) -> bool:
        return tokenizer is None or len(tokenizer.encode(answer, add_special_tokens=False)) <= max_tokens + 2

    out: list[str | None] = [None] * k
    for line in text.splitlines():
        m = _ANSWER_LINE.match(line)
        if not m:
            continue
        n, answer = int(m.group(1)), normalise(m.group(2))
        if 1 <= n <= k and out[n - 1] is None and answer and short(answer):
            out[n - 1] = answer
    if k == 1 and out[0] is None:  # a single item's answer may come without its number
        first = next((normalise(line) for line in text.splitlines() if normalise(line)), None)
        out[0] = first if first and short(first) else None
    return out


def normalise(answer: str) -> str:
    return answer.strip().strip("\"'`*").strip().rstrip(".").strip().lower()


class BatchPrompter:
    """Classify the prompter's items with ``engine`` (one of batchrun's engines over a loaded model)."""

    def __init__(self, engine: Any, prompter: Prompter, plan_config: PlanConfig | None = None,
                 interrupt: Callable[[], bool] | None = None, on_round: Callable[[int, int], None] | None = None):
        self.engine, self.prompter = engine, prompter
        self.plan_config = plan_config or PlanConfig(step_tokens=getattr(engine, "step_tokens", 8192),
                                                     block_size=getattr(engine, "block_size", 16))
        self.interrupt = interrupt
        self.on_round = on_round
        self.usage = Usage()
        self._rounds = 0

    def ask(self, prompts: Sequence[Sequence[int]]) -> list[list]:
        """Each prompt's slot answers, from one engine run over all of them."""
        reqs = self.prompter.requests(prompts)
        plan = plan_of(reqs, self.plan_config)
        done = {c.key: c for batch in self.engine.run(reqs, plan, interrupt=self.interrupt) for c in batch}
        if self.interrupt is not None and self.interrupt():
            raise Interrupted()
        missing = [r.key for r in reqs if r.key not in done]
        if missing:  # (an engine drops no request; a row error comes back as a completion)
            raise RuntimeError(f"the engine returned no answer for prompt(s) {missing[:5]}")
        self.usage.add(reqs, plan, sum(len(c.token_ids) for c in done.values()))
        if self.on_round is not None:
            self.on_round(self._rounds, len(reqs))
        self._rounds += 1
        return [None if done[r.key].error else self.prompter.answers(r, done[r.key].token_ids, len(p))
                for r, p in zip(reqs, prompts)]

    def classify(self, cfg: BatchPromptConfig, items: Sequence[int] | None = None) -> Outcome:
        """Every item's vote (``plan.batchprompt.run``): rounds of prompts of ``cfg.items_per_prompt`` items,
        and single-item prompts for items without a valid answer."""
        ids = range(len(self.prompter.items)) if items is None else items
        return run(ids, self.prompter.layout.labels, cfg, self.ask, lambda item: (self.ask([[item]])[0] or [None])[0])


def plan_of(requests: Sequence[Request], config: PlanConfig) -> Plan:
    return build_plan(TokenTable.from_lists(r.prompt_ids for r in requests),
                      np.array([r.max_tokens for r in requests], dtype=np.int64), config)
