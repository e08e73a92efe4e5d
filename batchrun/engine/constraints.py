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
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchrun.errors import RuntimeFailure

KINDS = ("json_schema", "regex", "choices", "grammar")
# JSON as models usually write it, on one line: a small model let free between tokens can pad an object with
# whitespace until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (it, its llguidance tokenizer)
_LOCK = threading.Lock()



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
    # (the matcher rows copy, how many rows share its lexer, how many copied it so far: ``matcher``)
    _template: list = field(default_factory=list, compare=False, repr=False)

    def new(self) -> Grammar:
        return Grammar(self)

    def renew(self) -> None:
        """The next matchers made start from a new template, grouped as ``matcher_group()`` says then (a benchmark
        comparing settings in one process)."""
        with _LOCK:
            self._template.clear()

    def matcher(self, own: bool = False) -> Any:
        """A new matcher at the grammar's start: a copy (``deep_copy``: 30 µs against 300 for a new one) of a
        template made once per group of rows. Copies of one template share what llguidance learns of the
        grammar's lexer, behind one lock: a row's first mask in a lexer state then costs a few µs instead of
        tens, but the pool's threads wait for each other there. ``own``: a row's matcher, in groups of
        ``matcher_group()`` rows (each group a template of its own); else (checking an output) a copy of the
        current template."""
        from llguidance import LLMatcher

        with _LOCK:
            if not self._template:
                self._template.extend([LLMatcher(self.tokenizer, self.grammar, log_level=0), matcher_group(), 0])
            template, group, made = self._template
            if own:
                if group and made >= group:  # (a new group: a lexer of its own)
                    template = self._template[0] = LLMatcher(self.tokenizer, self.grammar, log_level=0)
                    made = 0
                self._template[2] = made + 1
        shared = group is None or group > 0
        return template.deep_copy() if shared or not own else LLMatcher(self.tokenizer, self.grammar, log_level=0)


SHARE_MAX_CPUS = 4  # machines of at most this many CPUs give every row a copy of one matcher (``matcher_group``)
GROUP_ROWS = 64  # elsewhere, rows share a matcher's lexer in groups of this many


def matcher_group() -> int | None:
    """How many rows of a constraint share one lexer (copies of one matcher; None: all of them, 0: none).

    On a machine of at most ``SHARE_MAX_CPUS`` CPUs all of them: there the shared lexer's warm cache wins (the
    mask pipeline's llguidance work at 960 rows on 2 CPUs, ``benchmarks/mask_glue.py``: 0.27 s with one lexer,
    0.32 s in groups of 64, 0.62 s with a lexer per row). With more CPUs llguidance's pool has more threads,
    which would wait on one lexer's lock, so rows share a lexer in groups of ``GROUP_ROWS``: a lock for few
    rows, while the lexer's states are still learnt once per group instead of once per row. In a run of the
    example on the H200 (960 rows, 6 pool threads) the pool's work took 0.24 s in groups of 64, 0.25 s in
    groups of 16, 0.28 s with a lexer per row and 0.32 s with one lexer (``constraint-h200.jsonl``).
    ``BATCHRUN_SHARED_MATCHERS``: 1, all rows; 0, none; N (2 or more), groups of N rows."""
    setting = os.environ.get("BATCHRUN_SHARED_MATCHERS", "")
    if setting:
        if not setting.isdigit():
            raise RuntimeFailure(f"BATCHRUN_SHARED_MATCHERS={setting!r}: expected 1 (all rows share one lexer), "
                                 "0 (none) or a number of rows per shared lexer")
        n = int(setting)
        return None if n == 1 else n
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return None if len(cpus) <= SHARE_MAX_CPUS else GROUP_ROWS


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
    and batchrun's engine appends the rest of them at once, without a sampling step each (``forced_after``)."""

    def __init__(self, compiled: CompiledConstraint):
        self.compiled = compiled
        self._matcher = compiled.matcher(own=True)
        self._consumed = 0
        self.width = 0  # how many tokens the last mask computed allowed (0: none computed yet)
        self._ff: tuple[int, list[int]] | None = None  # (consumed, the forced tokens there)

    def allowed_tokens(self, generated: Sequence[int]) -> np.ndarray:
        """A boolean mask over the vocabulary: the tokens allowed after ``generated``."""
        t = time.perf_counter()
        mask = self._mask(generated)
        stats = self.compiled.stats
        stats["masks"] += 1
        stats["mask_s"] += time.perf_counter() - t
        return mask

    def forced_after(self, generated: Sequence[int]) -> list[int]:
        """The tokens forced after ``generated``, if the last mask forced its last token (the mask then allowed
        only the first of the forced tokens): the rest of them, known without computing anything. []
        otherwise (then the next mask finds what is forced, if anything, while the GPU runs that step)."""
        ff = self._ff
        if ff is not None and ff[0] == self._consumed == len(generated) - 1 and ff[1] and ff[1][0] == generated[-1]:
            return ff[1][1:]
        return []

    def accepts(self, token: int) -> bool:
        """Does the grammar allow ``token`` next (the mask's bit, without computing the mask)? If so it is
        consumed: the grammar is then up to date with the row's tokens, ``token`` included. Where the grammar
        now forces what comes next, or is finished, ``width`` is reset, so that the next mask is computed and a
        forced run found as usual (about 4 µs to ask inside free text, where nothing is forced). Many rows at
        once: ``grammar_pool.consume_drawn``."""
        if self._done() or self._matcher.try_consume_tokens([int(token)]) != 1:
            return False
        self._took()
        return True

    def _took(self) -> None:
        """After the matcher consumed a token drawn before its mask."""
        self._consumed += 1
        m = self._matcher
        if m.is_stopped() or m.compute_ff_bytes():  # (bytes, not tokens: 20 µs against 100 where text is forced)
            self.width = 0

    def restart(self) -> None:
        """A new matcher at the start (a refused token leaves llguidance's matcher broken for good); the next
        mask brings it up to the row's tokens."""
        self._matcher = self.compiled.matcher(own=True)
        self._consumed = 0
        self._ff = None

    def skips_mask(self, generated: Sequence[int], min_width: float) -> bool:
        """May the row's next token be drawn before its mask (its last mask allowed at least ``min_width``
        tokens, and the grammar is not finished)? If so the grammar is brought up to ``generated`` now."""
        if self.width < min_width:
            return False
        if len(generated) == self._consumed:  # (its last token taken by ``accepts``: finished would reset width)
            return True
        self._sync(generated)  # (a token or so: microseconds)
        return not self._done()

    def _done(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()

    def _narrow(self, width: int) -> list[int]:
        """After the mask at the matcher's state allowed ``width`` tokens: the tokens forced there (kept for
        ``forced_after``). Only a mask of one token can start a forced run, so only then is llguidance asked
        (the ask holds the GIL), and only if more than one byte is forced: one byte is one token at most, the
        mask's own, so there is nothing to append, and asking for the bytes is much cheaper. In
        ``benchmarks/mask_glue.py`` (960 rows) the forced-run work fell from 0.052 s to 0.040-0.042 s
        (``benchmarks/results/mask-glue-cpu.jsonl``)."""
        m = self._matcher
        forced = list(m.compute_ff_tokens()) if width == 1 and not self._done() and len(m.compute_ff_bytes()) > 1 \
            else []
        self._ff = (self._consumed, forced)
        return forced

    def _sync(self, generated: Sequence[int]) -> None:
        """Bring the matcher up to ``generated``."""
        m = self._matcher
        n = len(generated)
        if n < self._consumed:  # (never in practice: a row's generated tokens only grow)
            m.rollback(self._consumed - n)
            self._consumed = n
            self._ff = None
        if n > self._consumed:
            if not self._done():
                m.consume_tokens([int(t) for t in generated[self._consumed :]])
            self._consumed = n

    def _mask(self, generated: Sequence[int]) -> np.ndarray:
        """The tokens allowed after ``generated`` (complete or broken: EOS; a forced run: its first token)."""
        self._sync(generated)
        vocab = self.compiled.tokenizer.vocab_size
        mask = np.zeros(vocab, dtype=bool)
        if self._done():
            mask[list(self.compiled.eos_ids)] = True
            return mask
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").view(bool)[:vocab]
        forced = self._narrow(int(np.count_nonzero(mask)))
        if forced:
            mask = np.zeros(vocab, dtype=bool)
            mask[forced[0]] = True
        return mask

    def incomplete(self, token_ids: Sequence[int]) -> bool:
        """Does the final output ``token_ids`` (EOS excluded) leave the grammar unfinished?"""
        check = self.compiled.matcher()
        return not check.consume_tokens([int(t) for t in token_ids]) or not check.is_accepting()


def pack(allowed: Any, words: int) -> np.ndarray:
    """Allowed tokens (ids, a boolean mask over the vocabulary, or None: all) as ``words`` int32 words, 32
    tokens a word (bit ``t % 32`` of word ``t // 32`` says whether token t is allowed)."""
    if allowed is None:
        return np.full(words, -1, dtype=np.int32)
    if not (isinstance(allowed, np.ndarray) and allowed.dtype == np.bool_):  # a few ids: set their bits
        out = np.zeros(words, dtype=np.uint32)
        for t in allowed:
            out[t >> 5] |= np.uint32(1 << (t & 31))
        return out.view(np.int32)
    keep = np.zeros(words * 32, dtype=bool)
    n = min(len(allowed), len(keep))
    keep[:n] = allowed[:n]
    return np.packbits(keep, bitorder="little").view(np.int32)
