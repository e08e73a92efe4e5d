"""Constrained decoding (``sampling.constraint``): per-request token masks from a grammar, by llguidance.

A constraint (a JSON schema, a regex, a list of choices or a Lark grammar) compiles once per job into an
llguidance grammar checked against the tokenizer (``compile_constraint``: a bad regex is an error before any
row runs). Each request gets its own matcher (``Grammar``, a ``LogitsConstraint``): before each token it
catches up with the tokens generated so far and returns the tokens allowed next as a boolean mask over the
vocabulary; once the grammar is complete only EOS is allowed. An output that ended (``max_tokens``) before
the grammar was complete is reported by ``incomplete``. No torch here: the engines apply the masks.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("json_schema", "regex", "choices", "grammar")
# JSON as models usually write it, on one line: a small model let free between tokens can pad an object with
# whitespace until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (it, its llguidance tokenizer)
_LOCK = threading.Lock()


_EXECUTOR: list[Any] = []  # llguidance's thread pool, made on first use


class ConstraintError(ValueError):
    """A constraint that does not compile (the message says why)."""


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (built once per tokenizer: about a second)."""
    with _LOCK:
        hit = _TOKENIZERS.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            from llguidance import LLTokenizer

            backend = copy.copy(tokenizer.backend_tokenizer)
            backend.no_padding()
            backend.no_truncation()
            hit = _TOKENIZERS[id(tokenizer)] = (tokenizer, LLTokenizer(_plain_byte_level(backend.to_str()),
                                                                       eos_token=tokenizer.eos_token_id))
        return hit[1]


def _plain_byte_level(tokenizer_json: str) -> str:
    """A byte-level BPE tokenizer whose decoder is a sequence ending in ByteLevel (transformers' conversion of
    GGUF files writes ByteFallback, Fuse, Replace, ByteLevel) gets the plain ByteLevel decoder: llguidance
    reads the token bytes from the decoder's kind, and took such tokens' text ("Ġy") as their bytes."""
    spec = json.loads(tokenizer_json)
    pre, dec = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if pre.get("type") == "ByteLevel" and dec.get("type") == "Sequence":
        levels = [d for d in dec.get("decoders", []) if d.get("type") == "ByteLevel"]
        if levels:
            spec["decoder"] = levels[-1]
            return json.dumps(spec)
    return tokenizer_json


def grammar_text(kind: str, value: Any) -> str:
    """The llguidance grammar of one constraint (``kind`` in KINDS; a json_schema is a parsed value)."""
    from llguidance import LLMatcher

    if kind == "json_schema":  # one line, ", " and ": " (the schema's "x-guidance" options may say otherwise)
        return LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=JSON_STYLE)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "choices":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":  # Lark, or GBNF (llama.cpp's EBNF: "root ::= ..."), converted to Lark
        from llguidance.gbnf_to_lark import any_to_lark

        return LLMatcher.grammar_from_lark(any_to_lark(value))
    raise ValueError(f"unknown constraint kind {kind!r}")


@dataclass(frozen=True)
class CompiledConstraint:
    """A checked grammar; ``new()`` makes the matcher of one request."""

    kind: str
    grammar: str
    tokenizer: Any  # llguidance's
    eos_ids: tuple[int, ...]
    choices: tuple[str, ...] | None = None  # (kind "choices": the strings)
    stats: dict[str, float] = field(default_factory=lambda: {"masks": 0, "mask_s": 0.0}, compare=False)

    def new(self) -> Grammar:
        return Grammar(self)


def compile_constraint(kind: str, value: Any, tokenizer: Any) -> CompiledConstraint:
    """Compile and check a constraint against ``tokenizer`` (a Hugging Face fast tokenizer); raises
    ConstraintError with llguidance's message if the grammar is invalid."""
    from llguidance import LLMatcher

    tok = ll_tokenizer(tokenizer)
    try:
        grammar = grammar_text(kind, value)
    except (ValueError, TypeError) as e:
        raise ConstraintError(str(e)) from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if failed:
        raise ConstraintError(messages[0].strip() if messages else "invalid grammar")
    eos = tokenizer.eos_token_id
    return CompiledConstraint(kind, grammar, tok, (eos,) if eos is not None else (),
                              tuple(value) if kind == "choices" else None)


class Grammar:
    """One request's matcher (``engine.requests.LogitsConstraint``).

    Where the grammar forces what comes next (the rest of a JSON key, say), llguidance reports the forced
    tokens: the mask then allows only the first of them (so every engine emits the same, canonical tokens),
    and ``forced_tokens`` lets batchrun's engine append them all at once, without a sampling step each."""

    def __init__(self, compiled: CompiledConstraint):
        from llguidance import LLMatcher

        self.compiled = compiled
        self._matcher = LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        self._consumed = 0

    def allowed_tokens(self, generated: Sequence[int]) -> np.ndarray:
        """A boolean mask over the vocabulary: the tokens allowed after ``generated``."""
        t = time.perf_counter()
        mask = self._mask(generated)
        stats = self.compiled.stats
        stats["masks"] += 1
        stats["mask_s"] += time.perf_counter() - t
        return mask

    def forced_tokens(self, generated: Sequence[int]) -> list[int]:
        """The tokens the grammar forces right after ``generated`` (often none)."""
        t = time.perf_counter()
        self._sync(generated)
        m = self._matcher
        forced = [] if m.is_stopped() or m.is_error() else list(m.compute_ff_tokens())
        self.compiled.stats["mask_s"] += time.perf_counter() - t
        return forced

    def _sync(self, generated: Sequence[int]) -> None:
        """Bring the matcher up to ``generated``."""
        m = self._matcher
        n = len(generated)
        if n < self._consumed:  # (never in practice: a row's generated tokens only grow)
            m.rollback(self._consumed - n)
            self._consumed = n
        if n > self._consumed:
            if not m.is_stopped() and not m.is_error():
                m.consume_tokens([int(t) for t in generated[self._consumed :]])
            self._consumed = n

    def _mask(self, generated: Sequence[int]) -> np.ndarray:
        direct = self._direct(generated)
        if direct is not None:
            return direct
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little").view(bool)[: self.compiled.tokenizer.vocab_size]

    def _only(self, tokens: Sequence[int]) -> np.ndarray:
        mask = np.zeros(self.compiled.tokenizer.vocab_size, dtype=bool)
        mask[list(tokens)] = True
        return mask

    def _direct(self, generated: Sequence[int]) -> np.ndarray | None:
        """The mask when no computation is needed (complete, broken, or a forced token), else None."""
        self._sync(generated)
        m = self._matcher
        if m.is_stopped() or m.is_error():
            return self._only(self.compiled.eos_ids)
        forced = m.compute_ff_tokens()
        return self._only(forced[:1]) if forced else None

    def incomplete(self, token_ids: Sequence[int]) -> bool:
        """Does the final output ``token_ids`` (EOS excluded) leave the grammar unfinished?"""
        from llguidance import LLMatcher

        check = LLMatcher(self.compiled.tokenizer, self.compiled.grammar, log_level=0)
        return not check.consume_tokens([int(t) for t in token_ids]) or not check.is_accepting()


def allowed_for(constraints: Sequence[Any], generated: Sequence[Sequence[int]]) -> list[Any]:
    """Every row's ``allowed_tokens`` for one step (None where a row has no constraint). The grammars' masks
    are computed together, in parallel in llguidance's thread pool (no GIL): at a batch of hundreds of rows,
    one thread would take longer than the GPU's step."""
    out: list[Any] = [None] * len(constraints)
    grammars = []
    for i, (c, gen) in enumerate(zip(constraints, generated)):
        if isinstance(c, Grammar):
            grammars.append(i)
        elif c is not None:
            out[i] = c.allowed_tokens(gen)
    if len(grammars) < 4:  # (a pool is not worth it for a few rows)
        for i in grammars:
            out[i] = constraints[i].allowed_tokens(generated[i])
        return out
    t = time.perf_counter()
    todo = []
    for i in grammars:
        direct = constraints[i]._direct(generated[i])
        if direct is None:
            todo.append(i)
        else:
            out[i] = direct
    if todo:
        vocab = constraints[todo[0]].compiled.tokenizer.vocab_size
        words = (vocab + 31) // 32
        bits = np.zeros((len(todo), words), dtype=np.int32)
        if not _EXECUTOR:
            from llguidance import LLExecutor

            _EXECUTOR.append(LLExecutor())
        _EXECUTOR[0].unsafe_compute_mask_ptr([(constraints[i]._matcher, j) for j, i in enumerate(todo)],
                                             bits.ctypes.data, words * 4, len(todo))
        masks = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").view(bool)
        for j, i in enumerate(todo):
            out[i] = masks[j, :vocab]
    spent = (time.perf_counter() - t) / len(grammars)
    for i in grammars:  # (the pool's time, shared out)
        stats = constraints[i].compiled.stats
        stats["masks"] += 1
        stats["mask_s"] += spent
    return out
