"""One step's grammar work for many rows at once, in llguidance's thread pool (which runs without the GIL):
the rows' grammars take their new tokens and compute their masks (``StepMasks``), check tokens drawn before
their masks (``consume_drawn``), and look up forced runs (``narrow``). ``engine.masks`` decides when and on
which thread this runs; ``engine.constraints`` holds the grammars themselves. No torch here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from batchrun.engine.constraints import Grammar, pack
from batchrun.errors import RuntimeFailure

# llguidance's thread pool, made on first use, with the CPUs it leaves to the thread launching the steps (none if
# it is not split); one per setting of BATCHRUN_GRAMMAR_THREADS and BATCHRUN_GRAMMAR_CPUS (a job has one).
_POOLS: dict[tuple[str, str], tuple[Any, list[int]]] = {}


SHARED_HISTORY = 16  # rows of one constraint with equal outputs up to this long share a mask (``StepMasks``)


class StepMasks:
    """One step's token masks, written into ``out`` ([rows, ceil(vocab / 32)] int32 in ``pack``'s layout; a row
    without a constraint allows every token).

    Made on the main thread, which packs every constraint that is not a grammar (a few ids: cheap) and lines
    up the grammars' work. ``compute()`` then does that work: ``take_and_mask``, where each grammar takes its
    row's new tokens (the last one drawn, or a forced run too) and computes its mask, all in llguidance's
    thread pool, which runs without the GIL (``engine.masks`` runs it in its worker thread while the step is
    launched, or on the launching thread once the step's forward pass is launched), then ``finish`` (the
    widths, on the launching thread; a row sharing another's mask gets it where the masks are applied,
    ``shared_rows``, or copied, ``fill_shared``). A finished or broken grammar's mask allows only EOS
    (llguidance's own rule). The forced runs are looked up afterwards, by ``narrow(later)``, only for the
    grammars whose mask allows one token: a mask of one token is right without them, and they are needed only
    when the step's tokens are recorded.

    Rows of one constraint whose outputs so far are equal (and at most ``SHARED_HISTORY`` tokens long) are in
    the same grammar state: one of them computes the mask and looks up the forced run, and the others copy
    them. Every row of a job starts so: its first mask, and the forced text that opens a JSON object, are
    computed once, not once a row."""

    def __init__(self, constraints: Sequence[Any], generated: Sequence[Sequence[int]], out: np.ndarray):
        self.out = out
        # The grammars whose masks ``compute`` found allowing one token, each with the grammar whose forced run
        # it shares (None: its own).
        self.later: list[tuple[Grammar, Grammar | None]] = []
        at: list[int] = []
        ids: list[int] = []
        self._grammars: list[Grammar] = []
        self._rows: list[int] = []
        one: list[tuple[Any, int]] = []  # (matcher, token): rows one token behind, the common case
        behind: list[tuple[Any, list[int]]] = []  # (matcher, tokens): rows further behind (forced runs)
        self._matchers: list[tuple[Any, int]] = []  # (matcher, row): the grammars that compute their masks
        src: list[int] = []  # each grammar's mask: which of ``_matchers`` computes it
        self._twin: dict[int, tuple[int, Grammar]] = {}  # a row -> (the row, grammar) whose mask it copies
        seen: dict[tuple, tuple[int, Grammar, int]] = {}
        self._counts: dict[int, list] = {}
        last = count = None
        # One pass, with the list methods looked up once: this runs on the thread that launches the steps, about
        # a microsecond a row.
        add_grammar, add_row, add_one, add_src, add_matcher = (self._grammars.append, self._rows.append, one.append,
                                                               src.append, self._matchers.append)
        for i, c in enumerate(constraints):
            if not isinstance(c, Grammar):
                if c is None:
                    out[i] = -1
                    continue
                allowed = c.allowed_tokens(generated[i])
                out[i] = 0
                if isinstance(allowed, list | tuple):  # a few ids (forced text, label slots): set below
                    at += [i] * len(allowed)
                    ids += allowed
                else:
                    out[i] = pack(allowed, out.shape[1])
                continue
            gen = generated[i]
            add_grammar(c)
            add_row(i)
            m, n = c._matcher, len(gen)
            # (Not asking whether the grammar is done, a few µs a row: a finished grammar that takes one more
            # token (EOS, with EOS ignored) breaks, and a finished or broken grammar's mask allows only EOS.)
            k = n - c._consumed
            if k == 1:
                add_one((m, int(gen[-1])))
            elif k > 1:
                behind.append((m, [int(t) for t in gen[c._consumed :]]))
            elif k < 0:  # (never in practice: a row's generated tokens only grow)
                c._sync(gen)
            c._consumed = n
            if c.compiled is not last:
                last = c.compiled
                count = self._counts.setdefault(id(last), [last.stats, 0])
            count[1] += 1
            if n <= SHARED_HISTORY:
                first = seen.setdefault((id(last), tuple(gen)), (i, c, len(self._matchers)))
                if first[0] != i:
                    self._twin[i] = first[:2]
                    add_src(first[2])
                    continue
            add_src(len(self._matchers))
            add_matcher((m, i))
        if ids:
            tok = np.asarray(ids, dtype=np.int64)
            np.bitwise_or.at(out.view(np.uint32), (np.asarray(at), tok >> 5), (1 << (tok & 31)).astype(np.uint32))
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
        """The grammars' work: ``take_and_mask``, ``finish``, and the shared masks copied (``fill_shared``)."""
        self.take_and_mask()
        self.finish()
        self.fill_shared()

    def shared_rows(self) -> np.ndarray | None:
        """After ``finish``: the row of ``out`` that holds each row's mask ([rows] int64; a row sharing the mask
        of a row before it has that row's, and ``finish`` left its own row of ``out`` unwritten), or None where
        every row has its own. Gathering them where the masks are applied (on the device) spares copying them
        on the host: several megabytes a step in the first steps, where most rows share."""
        if not self._twin:
            return None
        src = np.arange(len(self.out), dtype=np.int64)
        rows, firsts = self._shared()
        src[rows] = firsts
        return src

    def fill_shared(self) -> None:
        """After ``finish``: the shared masks copied into ``out`` too, which then holds every row's mask."""
        if self._twin:
            rows, firsts = self._shared()
            self.out[rows] = self.out[firsts]

    def _shared(self) -> tuple[list[int], list[int]]:
        """(The rows sharing another row's mask, the rows whose masks they share.)"""
        return list(self._twin), [i for i, _ in self._twin.values()]

    def take_and_mask(self) -> None:
        """The grammars take their rows' new tokens and compute their masks: llguidance's calls alone, in its
        pool, without the GIL (safe in a worker thread: it holds the GIL only to make the calls, so it hardly
        slows a thread launching the step meanwhile). ``finish`` does the rest."""
        self._finished = False
        if not self._grammars:
            return
        t = time.perf_counter()
        pool = _executor()  # (once a step: it reads the pool's settings)
        for pairs in self._rounds:
            _take(pairs, pool)
        t_mask = time.perf_counter()
        self._t_take = t_mask - t
        out = self.out
        own = (self._grammars[0].compiled.tokenizer.vocab_size + 31) // 32  # llguidance writes exactly its width
        self._target = out if own == out.shape[1] and out.flags.c_contiguous else \
            np.zeros((len(out), own), dtype=np.int32)
        target = self._target
        pool.unsafe_compute_mask_ptr(self._matchers, target.ctypes.data, own * 4, len(target))
        self._t_mask = time.perf_counter() - t_mask
        if self._mine is not None:
            target = target[self._mine]
        # How many tokens each mask allows (numpy's loops run without the GIL too).
        self._widths = np.bitwise_count(target.view(np.uint64) if own % 2 == 0 else target.view(np.uint32)).sum(1)
        self._t_pool = time.perf_counter() - t

    def finish(self) -> None:
        """After ``take_and_mask`` (on the thread that uses the masks; once): the masks in ``out`` (but for
        the rows that share another's: ``shared_rows``), each grammar's width, and which grammars need their
        forced run (``later``)."""
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


def _take(pairs: list[tuple[Any, int]], pool: Any) -> None:
    """Each (matcher, token) takes its token (a refused one leaves that matcher broken: its mask allows EOS)."""
    if len(pairs) < PAR_MIN:
        for m, tok in pairs:
            m.consume_token(tok)
    elif pairs:
        pool.consume_token_par(pairs)


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
    """llguidance's pool (``_pool``)."""
    return _pool()[0]


def launcher_cpus() -> list[int]:
    """The CPUs llguidance's pool leaves to the thread that launches the steps (none if it is not split)."""
    return list(_pool()[1])


def _pool() -> tuple[Any, list[int]]:
    """llguidance's pool (``BATCHRUN_GRAMMAR_THREADS`` threads; default: llguidance's, 80% of the CPUs it may
    use) and the CPUs it leaves. On a machine of ``POOL_SPLIT_MIN`` CPUs or more its threads may use only the
    upper half of them, leaving the lower half to the thread that launches the steps, which grammar work on
    its CPUs slows (``BATCHRUN_GRAMMAR_CPUS=all``: every CPU)."""
    threads = os.environ.get("BATCHRUN_GRAMMAR_THREADS", "")
    where = os.environ.get("BATCHRUN_GRAMMAR_CPUS", "half")
    pool = _POOLS.get((threads, where))
    if pool is not None:
        return pool
    from llguidance import LLExecutor

    if threads and not (threads.isdigit() and int(threads) > 0):
        raise RuntimeFailure(f"BATCHRUN_GRAMMAR_THREADS={threads!r}: expected a number of threads above 0")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    split = len(cpus) >= POOL_SPLIT_MIN and where != "all"
    if split:  # (threads inherit the affinity of the thread that makes them: this one, for a moment)
        try:
            os.sched_setaffinity(0, cpus[len(cpus) // 2 :])
        except OSError:
            split = False
    try:
        executor = LLExecutor(int(threads)) if threads else LLExecutor()
    finally:
        if split:
            os.sched_setaffinity(0, cpus)
    pool = _POOLS[(threads, where)] = (executor, cpus[: len(cpus) // 2] if split else [])
    return pool
