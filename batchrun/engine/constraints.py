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
    _template: list = field(default_factory=list, compare=False, repr=False)  # (the matcher copied: ``matcher``)

    def new(self) -> Grammar:
        return Grammar(self)

    def matcher(self, own: bool = False) -> Any:
        """A new matcher at the grammar's start. A copy of one made once (``deep_copy``: 30 µs against 300 for a
        new one) shares with the other copies what llguidance learns of the grammar's lexer, behind one lock:
        a row's first mask inside a string then costs ~2 µs instead of ~60 (on the CPU, 960 rows), but the
        pool's threads wait for each other there. ``own``: a matcher of its own where the pool has many threads
        (``shared_matchers``)."""
        from llguidance import LLMatcher

        if own and not shared_matchers():
            return LLMatcher(self.tokenizer, self.grammar, log_level=0)
        with _LOCK:
            if not self._template:
                self._template.append(LLMatcher(self.tokenizer, self.grammar, log_level=0))
            return self._template[0].deep_copy()


SHARE_MAX_CPUS = 4  # machines of at most this many CPUs give rows copies of one matcher (``shared_matchers``)


def shared_matchers() -> bool:
    """Do the rows' matchers share one lexer (copies of one matcher)? On a machine of at most ``SHARE_MAX_CPUS``
    CPUs they do: there the shared lexer's warm cache wins (the mask pipeline's work at 960 rows on 2 CPUs,
    ``benchmarks/mask_glue.py``: 0.30-0.32 s against 0.60-0.63 s). On the H200's 16-CPU host one run of the
    example at 960 rows took 0.106 s for llguidance's masks against 0.052 s, and 0.243 s for taking the tokens
    against 0.197 s, likely the pool's threads waiting on the shared lexer's lock
    (``BATCHRUN_SHARED_MATCHERS=1|0`` chooses)."""
    setting = os.environ.get("BATCHRUN_SHARED_MATCHERS")
    if setting in ("0", "1"):
        return setting == "1"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cpus) <= SHARE_MAX_CPUS


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
        once: ``consume_drawn``."""
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
        (the ask holds the GIL, about 25 µs)."""
        forced = list(self._matcher.compute_ff_tokens()) if width == 1 and not self._done() else []
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


SHARED_HISTORY = 16  # rows of one constraint with equal outputs up to this long share a mask (``StepMasks``)


class StepMasks:
    """One step's token masks, written into ``out`` ([rows, ceil(vocab / 32)] int32 in ``pack``'s layout; a row
    without a constraint allows every token).

    Made on the main thread, which packs every constraint that is not a grammar (a few ids: cheap) and lines
    up the grammars' work. ``compute()`` then does that work: ``take_and_mask``, where each grammar takes its
    row's new tokens (the last one drawn, or a forced run too) and computes its mask, all in llguidance's
    thread pool, which runs without the GIL (``engine.masks`` runs it once the step's forward pass is launched,
    or in its worker thread), then ``finish`` (the widths and shared masks, on the launching thread).
    A finished or broken grammar's mask allows only EOS (llguidance's own rule). The forced runs are looked up
    afterwards, by ``narrow(later)``, only for the grammars whose mask allows one token: a mask of one token is
    right without them, and they are needed only when the step's tokens are recorded.

    Rows of one constraint whose outputs so far are equal (and at most ``SHARED_HISTORY`` tokens long) are in
    the same grammar state: one of them computes the mask and looks up the forced run, and the others copy
    them. Every row of a job starts so: its first mask, and the forced text that opens a JSON object, are
    computed once, not once a row."""

    def __init__(self, constraints: Sequence[Any], generated: Sequence[Sequence[int]], out: np.ndarray):
        self.out = out
        # The grammars whose masks ``compute`` found allowing one token, each with the grammar whose forced run
        # it shares (None: its own).
        self.later: list[tuple[Grammar, Grammar | None]] = []
        grammars, at, ids = [], [], []
        for i, c in enumerate(constraints):
            if c is None:
                out[i] = -1
            elif isinstance(c, Grammar):
                grammars.append((c, i, generated[i]))
            else:
                allowed = c.allowed_tokens(generated[i])
                out[i] = 0
                if isinstance(allowed, list | tuple):  # a few ids (forced text, label slots): set below
                    at += [i] * len(allowed)
                    ids += allowed
                else:
                    out[i] = pack(allowed, out.shape[1])
        if ids:
            tok = np.asarray(ids, dtype=np.int64)
            np.bitwise_or.at(out.view(np.uint32), (np.asarray(at), tok >> 5), (1 << (tok & 31)).astype(np.uint32))
        self._grammars = [g for g, _, _ in grammars]
        self._rows = [i for _, i, _ in grammars]
        one: list[tuple[Any, int]] = []  # (matcher, token): rows one token behind, the common case
        behind: list[tuple[Any, list[int]]] = []  # (matcher, tokens): rows further behind (forced runs)
        self._matchers: list[tuple[Any, int]] = []  # (matcher, row): the grammars that compute their masks
        src: list[int] = []  # each grammar's mask: which of ``_matchers`` computes it
        self._twin: dict[int, tuple[int, Grammar]] = {}  # a row -> (the row, grammar) whose mask it copies
        seen: dict[tuple, tuple[int, Grammar, int]] = {}
        self._counts: dict[int, list] = {}
        last = None
        for g, i, gen in grammars:  # (one pass: this runs on the thread that launches the steps)
            m, n = g._matcher, len(gen)
            # (Not asking whether the grammar is done, a few µs a row: a finished grammar that takes one more
            # token (EOS, with EOS ignored) breaks, and a finished or broken grammar's mask allows only EOS.)
            k = n - g._consumed
            if k == 1:
                one.append((m, int(gen[-1])))
            elif k > 1:
                behind.append((m, [int(t) for t in gen[g._consumed :]]))
            elif k < 0:  # (never in practice: a row's generated tokens only grow)
                g._sync(gen)
            g._consumed = n
            if g.compiled is not last:
                last = g.compiled
                count = self._counts.setdefault(id(last), [last.stats, 0])
            count[1] += 1
            if n <= SHARED_HISTORY:
                first = seen.setdefault((id(last), tuple(gen)), (i, g, len(self._matchers)))
                if first[0] != i:
                    self._twin[i] = first[:2]
                    src.append(first[2])
                    continue
            src.append(len(self._matchers))
            self._matchers.append((m, i))
        # The tokens to take, a round each (a matcher at most once a round: the pool takes a round at once): the
        # rows one token behind and the first of the others' tokens, then the others' next ones in turn. Made
        # here, so that a worker thread has only llguidance's calls to make (``take_and_mask``).
        self._rounds = [one + [(m, tokens[0]) for m, tokens in behind] if behind else one]
        for k in range(1, max((len(tokens) for _, tokens in behind), default=0)):
            self._rounds.append([(m, tokens[k]) for m, tokens in behind if len(tokens) > k])
        self._src = src
        self._mine = None if len(self._matchers) == len(out) else np.asarray([i for _, i in self._matchers])
        self._finished = False

    def compute(self) -> None:
        """The grammars' work: ``take_and_mask`` then ``finish``."""
        self.take_and_mask()
        self.finish()

    def take_and_mask(self) -> None:
        """The grammars take their rows' new tokens and compute their masks: llguidance's calls alone, in its
        pool, without the GIL (safe in a worker thread: it holds the GIL only to make the calls, so it hardly
        slows a thread launching the step meanwhile). ``finish`` does the rest."""
        self._finished = False
        if not self._grammars:
            return
        t = time.perf_counter()
        for pairs in self._rounds:
            _take(pairs)
        t_mask = time.perf_counter()
        self._t_take = t_mask - t
        out = self.out
        own = (self._grammars[0].compiled.tokenizer.vocab_size + 31) // 32  # llguidance writes exactly its width
        self._target = out if own == out.shape[1] and out.flags.c_contiguous else \
            np.zeros((len(out), own), dtype=np.int32)
        target = self._target
        _executor().unsafe_compute_mask_ptr(self._matchers, target.ctypes.data, own * 4, len(target))
        self._t_mask = time.perf_counter() - t_mask
        if self._mine is not None:
            target = target[self._mine]
        # How many tokens each mask allows (numpy's loops run without the GIL too).
        self._widths = np.bitwise_count(target.view(np.uint64) if own % 2 == 0 else target.view(np.uint32)).sum(1)
        self._t_pool = time.perf_counter() - t

    def finish(self) -> None:
        """After ``take_and_mask`` (on the thread that uses the masks; once): the masks in ``out``, copied to
        the rows that share them, each grammar's width, and which grammars need their forced run (``later``)."""
        if self._finished or not self._grammars:
            return
        self._finished = True
        t = time.perf_counter()
        out, target = self.out, self._target
        if target is not out:
            rows = np.asarray(self._rows)
            n = min(target.shape[1], out.shape[1])
            out[rows, :n] = target[rows, :n]
            out[rows, n:] = 0
        if self._twin:
            out[list(self._twin)] = out[[i for i, _ in self._twin.values()]]
        widths = self._widths[self._src]  # (each grammar's: a twin's is its first's)
        for g, w in zip(self._grammars, widths.tolist()):
            g.width = w
        twin = self._twin
        self.later = [(g, twin[i][1] if i in twin else None)
                      for g, i in ((self._grammars[j], self._rows[j]) for j in np.flatnonzero(widths == 1).tolist())]
        seconds = self._t_pool + time.perf_counter() - t
        for stats, n in self._counts.values():
            share = n / len(self._grammars)
            stats["masks"] += n
            stats["mask_s"] += seconds * share
            stats["mask_pool_s"] = stats.get("mask_pool_s", 0.0) + self._t_mask * share
            stats["take_s"] = stats.get("take_s", 0.0) + self._t_take * share
            stats["take_rounds"] = stats.get("take_rounds", 0) + len(self._rounds) * share  # (the pool's calls)
        for _, g in twin.values():
            g.compiled.stats["masks_shared"] = g.compiled.stats.get("masks_shared", 0) + 1


PAR_MIN = 4  # rows from which llguidance's pool takes their tokens (fewer: one by one, on this thread)


def _take(pairs: list[tuple[Any, int]]) -> None:
    """Each (matcher, token) takes its token (a refused one leaves that matcher broken: its mask allows EOS)."""
    if len(pairs) < PAR_MIN:
        for m, tok in pairs:
            m.consume_token(tok)
    elif pairs:
        _executor().consume_token_par(pairs)


def consume_drawn(grammars: Sequence[Grammar], tokens: Sequence[int]) -> list[bool]:
    """Each grammar's row drew ``tokens[i]`` before its mask: is it allowed (``Grammar.accepts``)? Many rows
    consume their tokens at once in llguidance's pool, without the GIL, instead of a few dozen microseconds
    each on the thread that launches the steps. A refused token breaks llguidance's matcher there, so that
    grammar restarts (``Grammar.restart``): a cost that ``engine.masks`` keeps rare by drawing before the mask
    only while nearly every such token is allowed."""
    if len(grammars) < PAR_MIN:
        return [g.accepts(t) for g, t in zip(grammars, tokens)]
    ok = _executor().consume_token_par([(g._matcher, int(t)) for g, t in zip(grammars, tokens)])
    for g, allowed in zip(grammars, ok):
        if allowed:
            g._took()
        else:
            g.restart()
    return ok


def narrow(later: Sequence[tuple[Grammar, Grammar | None]]) -> None:
    """The forced runs ``StepMasks`` left (``later``: the grammars whose mask allows one token, each with the
    grammar in the same state whose lookup it copies, or None). A mask of one token allowed exactly the first
    token of its forced run, so the masks already applied stay right. (The other grammars keep their last
    lookup: made at fewer consumed tokens, ``forced_after`` never reads it.)"""
    for g, first in later:
        if first is None:
            g._narrow(g.width)
    for g, first in later:
        if first is not None:
            g._ff = (g._consumed, list(first._ff[1]) if first._ff is not None else [])


POOL_SPLIT_MIN = 8  # CPUs from which llguidance's pool keeps to the upper half of them


def _executor() -> Any:
    """llguidance's pool (``BATCHRUN_GRAMMAR_THREADS`` threads; default: llguidance's, 80% of the CPUs it may
    use). On a machine of ``POOL_SPLIT_MIN`` CPUs or more its threads may use only the upper half of them,
    leaving the lower half to the thread that launches the steps, which grammar work on other CPUs slows
    (``BATCHRUN_GRAMMAR_CPUS=all``: every CPU). On the H200 host the split measured within that machine's
    noise (README), with no longer waits for masks."""
    if not _EXECUTOR:
        from llguidance import LLExecutor

        threads = os.environ.get("BATCHRUN_GRAMMAR_THREADS")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        split = len(cpus) >= POOL_SPLIT_MIN and os.environ.get("BATCHRUN_GRAMMAR_CPUS", "half") != "all"
        if split:  # (threads inherit the affinity of the thread that makes them: this one, for a moment)
            try:
                os.sched_setaffinity(0, cpus[len(cpus) // 2 :])
            except OSError:
                split = False
        try:
            _EXECUTOR.append(LLExecutor(int(threads)) if threads else LLExecutor())
        finally:
            if split:
                os.sched_setaffinity(0, cpus)
    return _EXECUTOR[0]
