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
    and batchrun's engine appends the rest of them at once, without a sampling step each (``forced_after``)."""

    def __init__(self, compiled: CompiledConstraint):
        from llguidance import LLMatcher

        self.compiled = compiled
        self._matcher = LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        self._consumed = 0
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

    def _done(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()

    def _narrow(self, width: int) -> list[int]:
        """After the mask at the matcher's state allowed ``width`` tokens: the tokens forced there (kept for
        ``forced_after``). Only a mask of one token can start a forced run, so only then is llguidance asked
        (the ask holds the GIL: skipping it for the other rows keeps the mask worker out of the main thread's
        way)."""
        forced = list(self._matcher.compute_ff_tokens()) if width == 1 else []
        self._ff = (self._consumed, forced)
        return forced

    def _sync(self, generated: Sequence[int]) -> None:
        """Bring the matcher up to ``generated``."""
        m = self._matcher
        n = len(generated)
        if n < self._consumed:  # (never in practice: a row's generated tokens only grow)
            m.rollback(self._consumed - n)
            self._consumed = n
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
        from llguidance import LLMatcher

        check = LLMatcher(self.compiled.tokenizer, self.compiled.grammar, log_level=0)
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


def mask_bits(constraints: Sequence[Any], generated: Sequence[Sequence[int]], vocab: int,
              later: list | None = None) -> tuple[list[int], np.ndarray]:
    """One step's token masks: the rows that have a constraint, and their masks packed (``pack``) into
    [len(rows), ceil(vocab / 32)] int32. Grammars are brought up to their rows' tokens together and their
    masks computed together, in llguidance's thread pool (no GIL): at a batch of hundreds of rows one thread
    would take longer than the GPU's step. The forced runs are looked up only for rows whose mask allows a
    single token (``Grammar._narrow``); with ``later`` (a list) that lookup, which holds the GIL, is left for
    ``narrow(later)`` to do once the step is launched: a mask of one token is right without it, and the forced
    runs are needed only when the step's tokens are recorded. Safe to run in a worker thread while the GPU
    runs the step."""
    words = (vocab + 31) // 32
    rows = [i for i, c in enumerate(constraints) if c is not None]
    bits = np.zeros((len(rows), words), dtype=np.int32)
    grammars, at, ids = [], [], []
    for j, i in enumerate(rows):
        c = constraints[i]
        if isinstance(c, Grammar):
            grammars.append((j, c, generated[i]))
            continue
        allowed = c.allowed_tokens(generated[i])
        if isinstance(allowed, list | tuple):  # a few ids (forced text, label slots): set below, all at once
            at += [j] * len(allowed)
            ids += allowed
        else:
            bits[j] = pack(allowed, words)
    if ids:
        tok = np.asarray(ids, dtype=np.int64)
        np.bitwise_or.at(bits.view(np.uint32), (np.asarray(at), tok >> 5), (1 << (tok & 31)).astype(np.uint32))
    if not grammars:
        return rows, bits
    t = time.perf_counter()
    _catch_up([(g, gen) for _, g, gen in grammars])
    live = []
    flat = bits.view(np.uint32)
    for j, g, _ in grammars:
        if g._done():
            for tok in g.compiled.eos_ids:
                flat[j, tok >> 5] |= np.uint32(1 << (tok & 31))
        else:
            live.append((g, j))
    if live:
        own = (live[0][0].compiled.tokenizer.vocab_size + 31) // 32  # llguidance writes exactly its width
        target = bits if own == words else np.zeros((len(rows), own), dtype=np.int32)
        t_mask = time.perf_counter()
        _executor().unsafe_compute_mask_ptr([(g._matcher, j) for g, j in live], target.ctypes.data, own * 4,
                                            len(rows))
        t_mask = time.perf_counter() - t_mask
        at = np.array([j for _, j in live])
        if target is not bits:
            n = min(own, words)
            bits[at, :n] = target[at, :n]
        widths = np.bitwise_count(flat[at]).sum(axis=1).tolist()
        if later is not None:
            later.extend((g, w) for (g, _), w in zip(live, widths))
        else:
            for (g, j), width in zip(live, widths):
                forced = g._narrow(width)
                if forced:
                    flat[j] = 0
                    flat[j, forced[0] >> 5] = np.uint32(1 << (forced[0] & 31))
    _account([g for _, g, _ in grammars], time.perf_counter() - t)
    if live:
        live[0][0].compiled.stats["mask_pool_s"] = live[0][0].compiled.stats.get("mask_pool_s", 0.0) + t_mask
    return rows, bits


def narrow(later: Sequence[tuple[Grammar, int]]) -> None:
    """The forced runs ``mask_bits(..., later)`` left (each grammar with its mask's width). A mask of one token
    allowed exactly the first token of its forced run, so the masks already applied stay right."""
    for g, width in later:
        g._narrow(width)


def _executor() -> Any:
    """llguidance's pool (``BATCHRUN_GRAMMAR_THREADS`` threads; default: llguidance's, 80% of the cores)."""
    if not _EXECUTOR:
        import os

        from llguidance import LLExecutor

        threads = os.environ.get("BATCHRUN_GRAMMAR_THREADS")
        _EXECUTOR.append(LLExecutor(int(threads)) if threads else LLExecutor())
    return _EXECUTOR[0]


def _catch_up(grammars: Sequence[tuple[Grammar, Sequence[int]]]) -> None:
    """Bring each grammar up to its row's tokens; rows one token behind (the common case) in one parallel
    call."""
    one = []
    for g, gen in grammars:
        if len(gen) == g._consumed + 1 and not g._done():
            one.append((g, int(gen[-1])))
        else:
            g._sync(gen)
    if len(one) < 4:
        for g, tok in one:
            g._matcher.consume_token(tok)
    else:
        _executor().consume_token_par([(g._matcher, tok) for g, tok in one])
    for g, _ in one:
        g._consumed += 1


def _account(grammars: Sequence[Grammar], seconds: float) -> None:
    """Share ``seconds`` of grammar work out over ``grammars``' stats (one mask each)."""
    counts: dict[int, list] = {}
    for g in grammars:
        counts.setdefault(id(g.compiled), [g.compiled.stats, 0])[1] += 1
    for stats, n in counts.values():
        stats["masks"] += n
        stats["mask_s"] += seconds * n / len(grammars)
