"""Result assembly: which engine requests an input row becomes, and which output rows the completions make.

The engine only sees requests with opaque keys; an assembler decides what a key means. Today every input
row is one request and one output row (``OneToOne``). The same seam takes the next modes: ``n`` samples
(one row -> N requests -> N output rows, a ``sample`` column) and BatchPrompt (K rows -> one prompt per
round -> K output rows after the vote). Resume works on input rows: an input row whose output rows are
all committed is never asked for again, so an assembler hands back all of a row's output rows at once.
No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from batchrun.engine.requests import Completion, LogitsConstraint, Request


@dataclass(frozen=True)
class RowResult:
    """One output row: the input row it belongs to (index into the input table) and its result columns."""

    row: int
    values: dict[str, Any]


class Assembler(Protocol):
    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: LogitsConstraint | None = None) -> list[Request]:
        """The engine requests for input row ``row``."""
        ...

    def add(self, completion: Completion) -> list[RowResult]:
        """Take one finished request; the output rows it completes (maybe none yet)."""
        ...

    def failed(self, row: int, message: str) -> list[RowResult]:
        """Output rows for an input row that fails before the engine (template error, too long, ...)."""
        ...


class OneToOne:
    """Each input row is one request (its key is the row's index) and one output row."""

    def __init__(self, prompt_lengths: Sequence[int]):
        self.prompt_lengths = prompt_lengths

    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: LogitsConstraint | None = None) -> list[Request]:
        return [Request(key=row, prompt_ids=prompt_ids, max_tokens=max_tokens, seed=seed, constraint=constraint)]

    def add(self, completion: Completion) -> list[RowResult]:
        c = completion
        return [RowResult(c.key, {"output": None if c.error else c.text,
                                  "prompt_tokens": int(self.prompt_lengths[c.key]),
                                  "output_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                                  "error": c.error})]

    def failed(self, row: int, message: str) -> list[RowResult]:
        return [RowResult(row, {"output": None, "prompt_tokens": int(self.prompt_lengths[row]) or None,
                                "output_tokens": 0, "finish_reason": "error", "error": message})]
