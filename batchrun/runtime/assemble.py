"""Result assembly: which engine requests an input row becomes, and which output rows the completions make.

The engine only sees requests with opaque keys; an assembler decides what a key means. Today every input
row is one request and one output row (``OneToOne``). The same seam takes the next modes: ``n`` samples
(one row -> N requests -> N output rows, a ``sample`` column) and BatchPrompt (K rows -> one prompt per
round -> K output rows after the vote). Resume works on input rows: an input row whose output rows are
all committed is never asked for again, so an assembler hands back all of a row's output rows at once.
No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from batchrun.engine.constraints import Grammar
from batchrun.engine.requests import Completion, LogitsConstraint, Request
from batchrun.io.sink import OUTPUT_JSON, RESULT_FIELDS


@dataclass(frozen=True)
class RowResult:
    """One output row: the input row it belongs to (index into the input table) and its result columns."""

    row: int
    values: dict[str, Any]


class Assembler(Protocol):
    fields: list[pa.Field]  # the result columns of its output rows

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
    """Each input row is one request (its key is the row's index) and one output row.

    Under a grammar constraint, an output that ended before the grammar was complete (``max_tokens``, or a
    stop string) keeps its finish reason and text and gets an error saying so; with ``json_output`` (a
    json_schema constraint) the ``output_json`` column holds the parsed output (as JSON text)."""

    def __init__(self, prompt_lengths: Sequence[int], json_output: bool = False):
        self.prompt_lengths = prompt_lengths
        self.json_output = json_output
        self.fields = [*RESULT_FIELDS, OUTPUT_JSON] if json_output else list(RESULT_FIELDS)
        self._grammars: dict[int, Grammar] = {}

    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: LogitsConstraint | None = None) -> list[Request]:
        if isinstance(constraint, Grammar):
            self._grammars[row] = constraint
        return [Request(key=row, prompt_ids=prompt_ids, max_tokens=max_tokens, seed=seed, constraint=constraint)]

    def add(self, completion: Completion) -> list[RowResult]:
        c = completion
        error, parsed = c.error, None
        grammar = self._grammars.pop(c.key, None)
        if grammar is not None and not error:
            if grammar.incomplete(c.token_ids):
                cause = "reached max_tokens" if c.finish_reason == "length" else "was cut by a stop string"
                error = f"the output {cause} before its {grammar.compiled.kind} constraint was complete"
            elif grammar.compiled.kind == "json_schema":
                parsed = _json_text(c.text)
        values = {"output": None if c.error else c.text, "prompt_tokens": int(self.prompt_lengths[c.key]),
                  "output_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "error": error}
        if self.json_output:
            values["output_json"] = parsed
        return [RowResult(c.key, values)]

    def failed(self, row: int, message: str) -> list[RowResult]:
        self._grammars.pop(row, None)
        values = {"output": None, "prompt_tokens": int(self.prompt_lengths[row]) or None, "output_tokens": 0,
                  "finish_reason": "error", "error": message}
        if self.json_output:
            values["output_json"] = None
        return [RowResult(row, values)]


def _json_text(text: str) -> str | None:
    """The output parsed and written back as compact JSON (None if it does not parse)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return None
