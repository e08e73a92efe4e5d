"""Result assembly: which engine requests an input row becomes, and which output rows the completions make.

The engine only sees requests with opaque keys; an assembler decides what a key means. ``OneToOne``: every
input row is one request and one output row. ``Samples``: ``n`` samples per input row (one row -> n requests
keyed (row, sample) -> n output rows with a ``sample`` column). BatchPrompt (K rows -> one prompt per round
-> K output rows after the vote) plugs in here too. Resume works on input rows: an input row whose output
rows are all committed is never asked for again, so an assembler hands back all of a row's output rows at
once. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from batchrun.engine.constraints import Grammar
from batchrun.engine.requests import Completion, LogitsConstraint, Request, SamplingParams, sample_seed
from batchrun.io.json_arrow import conforms
from batchrun.io.sink import CHOICE_PROBS, OUTPUT_JSON, RESULT_FIELDS, SAMPLE, TOKEN_LOGPROBS, TOKENS, TOP_LOGPROBS


@dataclass(frozen=True)
class RowResult:
    """One output row: the input row it belongs to (index into the input table) and its result columns."""

    row: int
    values: dict[str, Any]


class Assembler(Protocol):
    fields: list[pa.Field]  # the result columns of its output rows

    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: Callable[[], LogitsConstraint] | None = None,
                 sampling: SamplingParams | None = None) -> list[Request]:
        """The engine requests for input row ``row`` (``seed``: the row's; ``constraint`` makes one request's
        constraint; ``sampling``: the row's own settings, None for the engine's)."""
        ...

    def add(self, completion: Completion) -> list[RowResult]:
        """Take one finished request; the output rows it completes (maybe none yet)."""
        ...

    def failed(self, row: int, message: str) -> list[RowResult]:
        """Output rows for an input row that fails before the engine (template error, too long, ...)."""
        ...


def make_assembler(n: int, prompt_lengths: Sequence[int], json_output: pa.DataType | None = None,
                   logprobs: int | None = None, choices: bool = False,
                   row_n: Sequence[int] | None = None) -> Assembler:
    """The assembler of a job with ``n`` samples per input row (``sampling.n``; ``row_n``: each row's own,
    at most ``n``)."""
    if n > 1:
        return Samples(n, prompt_lengths, json_output, logprobs, choices, row_n)
    return OneToOne(prompt_lengths, json_output, logprobs, choices)


class OneToOne:
    """Each input row is one request (its key is the row's index) and one output row.

    Under a grammar constraint, an output that ended before the grammar was complete (``max_tokens``, or a
    stop string) keeps its finish reason and text and gets an error saying so. With ``json_output`` (a
    json_schema constraint) the ``output_json`` column holds the parsed output: a struct when the schema fixes
    one (``io.json_arrow``), else JSON text (``pa.string()``). With ``logprobs`` (``sampling.logprobs``):
    ``token_logprobs`` and, for k > 0, ``top_logprobs``. With ``choices`` (a choices constraint):
    ``choice_probs``."""

    def __init__(self, prompt_lengths: Sequence[int], json_output: pa.DataType | None = None,
                 logprobs: int | None = None, choices: bool = False):
        self.prompt_lengths = prompt_lengths
        self.json_output = json_output
        self.logprobs = logprobs
        self.choices = choices
        self.fields = list(RESULT_FIELDS)
        if json_output is not None:
            self.fields.append(pa.field(OUTPUT_JSON.name, json_output))
        if logprobs is not None:
            self.fields += [TOKENS, TOKEN_LOGPROBS, TOP_LOGPROBS] if logprobs else [TOKENS, TOKEN_LOGPROBS]
        if choices:
            self.fields.append(CHOICE_PROBS)
        self._grammars: dict[Hashable, Grammar] = {}  # request key -> its grammar

    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: Callable[[], LogitsConstraint] | None = None,
                 sampling: SamplingParams | None = None) -> list[Request]:
        return [self._request(row, prompt_ids, max_tokens, seed, constraint, sampling)]

    def add(self, completion: Completion) -> list[RowResult]:
        return [RowResult(completion.key, self._values(completion, completion.key))]

    def failed(self, row: int, message: str) -> list[RowResult]:
        return [RowResult(row, self._failed(row, message))]

    def _request(self, key: Hashable, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: Callable[[], LogitsConstraint] | None, sampling: SamplingParams | None) -> Request:
        made = None if constraint is None else constraint()
        if isinstance(made, Grammar):
            self._grammars[key] = made
        return Request(key=key, prompt_ids=prompt_ids, max_tokens=max_tokens, seed=seed, constraint=made,
                       sampling=sampling)

    def _values(self, c: Completion, row: int) -> dict[str, Any]:
        """The result columns of completion ``c`` of input row ``row``."""
        error, parsed = c.error, None
        grammar = self._grammars.pop(c.key, None)
        if grammar is not None and not error:
            if grammar.incomplete(c.token_ids):
                cause = "reached max_tokens" if c.finish_reason == "length" else "was cut by a stop string"
                error = f"the output {cause} before its {grammar.compiled.kind} constraint was complete"
            elif grammar.compiled.kind == "json_schema":
                parsed = _parsed(c.text, self.json_output)
        values = {"output": None if c.error else c.text, "prompt_tokens": int(self.prompt_lengths[row]),
                  "output_tokens": len(c.token_ids), "finish_reason": c.finish_reason, "error": error}
        if self.json_output is not None:
            values["output_json"] = parsed
        if self.logprobs is not None:
            values["tokens"] = c.token_texts
            values["token_logprobs"] = c.logprobs
            if self.logprobs:
                values["top_logprobs"] = None if c.top_logprobs is None else [
                    [{"token_id": i, "token": t, "logprob": v} for i, t, v in top] for top in c.top_logprobs]
        if self.choices:
            values["choice_probs"] = None if c.choice_probs is None else list(c.choice_probs.items())
        return values

    def _failed(self, row: int, message: str) -> dict[str, Any]:
        values = {"output": None, "prompt_tokens": int(self.prompt_lengths[row]) or None, "output_tokens": 0,
                  "finish_reason": "error", "error": message}
        if self.json_output is not None:
            values["output_json"] = None
        if self.logprobs is not None:
            values["tokens"] = None
            values["token_logprobs"] = None
            if self.logprobs:
                values["top_logprobs"] = None
        if self.choices:
            values["choice_probs"] = None
        return values


class Samples(OneToOne):
    """``n`` samples per input row: n requests keyed (row, sample), with the same prompt (the planner's prefix
    trie computes it once) and seeds ``sample_seed(row seed, sample)`` — sample 0 keeps the row's seed, so it
    is the row's output with n = 1 (greedy decoding makes every sample the same). The n output rows carry a
    ``sample`` column (0 .. n-1) and are handed back together, in sample order, when the last one completes.
    A row that fails before the engine gives n error rows."""

    def __init__(self, n: int, prompt_lengths: Sequence[int], json_output: pa.DataType | None = None,
                 logprobs: int | None = None, choices: bool = False, row_n: Sequence[int] | None = None):
        super().__init__(prompt_lengths, json_output, logprobs, choices)
        self.n = n
        self.row_n = row_n  # (an OpenAI batch file: each line's own n)
        self.fields = [SAMPLE, *self.fields]
        self._done: dict[int, dict[int, dict[str, Any]]] = {}  # row -> sample -> values, until all n are in

    def requests(self, row: int, prompt_ids: list[int], max_tokens: int, seed: int,
                 constraint: Callable[[], LogitsConstraint] | None = None,
                 sampling: SamplingParams | None = None) -> list[Request]:
        return [self._request((row, k), prompt_ids, max_tokens, sample_seed(seed, k), constraint, sampling)
                for k in range(self.samples(row))]

    def add(self, completion: Completion) -> list[RowResult]:
        row, k = completion.key
        done = self._done.setdefault(row, {})
        done[k] = {"sample": k, **self._values(completion, row)}
        if len(done) < self.samples(row):
            return []
        del self._done[row]
        return [RowResult(row, done[k]) for k in range(len(done))]

    def failed(self, row: int, message: str) -> list[RowResult]:
        return [RowResult(row, {"sample": k, **self._failed(row, message)}) for k in range(self.samples(row))]

    def samples(self, row: int) -> int:
        return self.n if self.row_n is None else self.row_n[row]


def _parsed(text: str, kind: pa.DataType | None) -> Any:
    """The output parsed: a value of the struct type ``kind``, or compact JSON text (None if it does not parse,
    or does not fit the struct)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if kind is not None and pa.types.is_struct(kind):
        return value if conforms(value, kind) else None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
