"""Deterministic synthetic workloads for benchmarks (../shared/BENCHMARKS.md, "Workloads"): fewshot,
templates, rag, noshare.

Planning benchmarks exclude tokenization, so prompts are produced directly as TOKENS: every workload is built
from a fixed synthetic lexicon of 4096 pronounceable lowercase words, each with fixed token ids from a
49152-id vocabulary (90% of the words are one token, the 10% longest two: ~1.1 tokens a word), so the same
word always gives the same ids, as with a real tokenizer. Lengths in the table below are in WORDS:

| name      | rows | prompt                                                                 | max_tokens               |
|-----------|------|------------------------------------------------------------------------|--------------------------|
| fewshot   | 4096 | one 1200-word block shared by all + unique input of 30-300 words       | uniform 4-32             |
| templates | 4096 | 16 templates of 100-1500 words (rows spread evenly) + question 20-500  | lognormal med 128 16-512 |
| rag       | 2048 | 200-word system prompt -> 128 documents of 400-1200 -> 16 questions of | uniform 32-256           |
|           |      | 10-40 words each (unique per row)                                      |                          |
| noshare   | 2048 | unique, lognormal median 300 words, clipped 16-2000                    | lognormal med 150 8-1024 |

Rows are at scale 1; ``rows = round(base rows * scale)`` unless ``rows=`` is given; templates keep 16
templates, rag keeps 16 questions per document (``ceil(rows / 16)`` documents). Rows come out in a seeded
SHUFFLED order, so any sharing must be found by the planner. Unique parts are random words, so unrelated rows
may still share a first word or two by chance (as real text does): "noshare" has ~0.05% of its tokens shared.
Lognormal sigmas are not in the table: outputs use 0.55 (matches the anchor run's mean output of ~148 tokens
for templates), the noshare prompt 0.75.

Generation is vectorized numpy: the distinct text pieces (shared blocks, and every unique part) are
tokenized into a pool in chunks, then rows are assembled by gathering from the pool in chunks of 256k tokens
(no Python loop per token or per row). Memory is the output plus the pool of unique text plus a few MB of
scratch. Measured on the 2-core dev box (/usr/bin/time -v): ``make("fewshot", rows=100_000)`` = 150 M tokens
(600 MB) in 0.5-1 s, peak RSS 0.75 GB; ``make("fewshot", rows=1_000_000)`` = 1.53e9 tokens = 6.1 GB int32
(+ 8 MB offsets) in 8-20 s (mostly page faults on the fresh 6 GB), peak RSS 7.1 GB (the ~0.7 GB pool of
unique inputs is freed on return).

``Workload.texts()`` / ``make_texts()`` give the same prompts as text (the words joined by spaces) for
tokenizer-throughput benchmarks with a real tokenizer.

    python benchmarks/workloads.py                      # every workload at scale 1: rows, tokens, time
    python benchmarks/workloads.py fewshot --rows 100000
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchrun.tokens import TokenTable

VOCAB = 49152  # SmolLM2's vocabulary size
LEXICON_SIZE = 4096
TWO_TOKEN_FRACTION = 0.10
_LEXICON_SEED = 20261129  # fixed: the word -> token ids mapping never depends on a workload's seed
_WORDS_PER_CHUNK = 1 << 22  # words tokenized per step when building the pool
_TOKENS_PER_CHUNK = 1 << 18  # tokens gathered per step when assembling rows
_OUT_SIGMA = 0.55
_NOSHARE_PROMPT_SIGMA = 0.75

BASE_ROWS = {"fewshot": 4096, "templates": 4096, "rag": 2048, "noshare": 2048}
NAMES = tuple(BASE_ROWS)


# --------------------------------------------------------------------------------------------- lexicon
@dataclass(frozen=True)
class Lexicon:
    words: list[str]  # [LEXICON_SIZE] distinct pronounceable lowercase words
    tok0: np.ndarray  # int32 [LEXICON_SIZE]: each word's first token id
    tok1: np.ndarray  # int32 [LEXICON_SIZE]: its second token id, or -1 for a one-token word
    token_word: np.ndarray  # int32 [VOCAB]: the word a word's FIRST token starts, -1 for others (decoding)

    @property
    def two(self) -> np.ndarray:
        return self.tok1 >= 0


_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "b", "d", "l", "m",
           "n", "p", "r", "s", "t", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh", "st", "th",
           "tr", "", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "ee", "ai", "ou", "oo", "y")
_CODAS = ("", "", "", "", "", "n", "r", "s", "t", "l", "m", "d", "nd", "st", "ng", "ck", "nt", "ll", "sh")


@functools.cache
def lexicon() -> Lexicon:
    """The fixed synthetic lexicon (built once, the same on every machine)."""
    rng = np.random.default_rng(_LEXICON_SEED)
    words: dict[str, None] = {}
    while len(words) < LEXICON_SIZE:  # ~4k iterations, once per process
        n_syl = int(rng.choice((1, 2, 3), p=(0.35, 0.45, 0.2)))  # consonant-vowel syllables, a final coda
        w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                    for _ in range(n_syl)) + _CODAS[rng.integers(len(_CODAS))]
        words.setdefault(w)
    word_list = list(words)
    n_two = round(TWO_TOKEN_FRACTION * LEXICON_SIZE)
    by_length = np.argsort(np.array([len(w) for w in word_list]) + rng.random(LEXICON_SIZE), kind="stable")
    two = by_length[-n_two:]  # the longest words split in two, as a BPE would split rare long words
    ids = rng.permutation(VOCAB).astype(np.int32)
    tok0 = np.empty(LEXICON_SIZE, np.int32)
    tok1 = np.full(LEXICON_SIZE, -1, np.int32)
    one = np.setdiff1d(np.arange(LEXICON_SIZE), two)
    tok0[one] = ids[: len(one)]  # whole-word tokens: distinct ids
    tok0[two] = ids[len(one) : len(one) + n_two]  # distinct first pieces (so every pair is distinct) ...
    tok1[two] = rng.choice(ids[len(one) + n_two :], n_two)  # ... and any second piece
    token_word = np.full(VOCAB, -1, np.int32)
    token_word[tok0] = np.arange(LEXICON_SIZE, dtype=np.int32)
    return Lexicon(word_list, tok0, tok1, token_word)


def _tokenize_pieces(word_counts: np.ndarray, rng: np.random.Generator) -> TokenTable:
    """A TokenTable of random-word pieces, piece i of ``word_counts[i]`` words (chunked: bounded scratch)."""
    lex = lexicon()
    word_counts = np.asarray(word_counts, dtype=np.int64)
    word_end = np.cumsum(word_counts)
    piece_tokens = np.zeros(len(word_counts), dtype=np.int64)
    parts = []
    p0 = 0
    while p0 < len(word_counts):  # a chunk of whole pieces holding about _WORDS_PER_CHUNK words
        w_start = int(word_end[p0] - word_counts[p0])
        p1 = max(p0 + 1, int(np.searchsorted(word_end, w_start + _WORDS_PER_CHUNK, side="right")))
        n_words = int(word_end[p1 - 1]) - w_start
        w = rng.integers(0, LEXICON_SIZE, n_words, dtype=np.int16)
        pair = np.empty((n_words, 2), dtype=np.int32)
        pair[:, 0] = lex.tok0[w]
        pair[:, 1] = lex.tok1[w]
        keep = np.ones((n_words, 2), dtype=bool)
        keep[:, 1] = pair[:, 1] >= 0
        parts.append(pair[keep])
        cum = np.zeros(n_words + 1, dtype=np.int64)  # tokens before each word of the chunk
        np.cumsum(keep[:, 1], out=cum[1:])
        cum[1:] += np.arange(1, n_words + 1)
        bounds = word_end[p0:p1] - w_start
        piece_tokens[p0:p1] = np.diff(np.r_[0, cum[bounds]])
        p0 = p1
    offsets = np.zeros(len(word_counts) + 1, dtype=np.int64)
    np.cumsum(piece_tokens, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return TokenTable(tokens, offsets)


def _assemble(pool: TokenTable, segs: np.ndarray) -> TokenTable:
    """Row r = concatenation of pool pieces ``segs[r, 0], segs[r, 1], ...`` (gathered ~1M tokens at a time)."""
    segs = np.ascontiguousarray(segs, dtype=np.int64)
    pool_len = pool.lengths
    seg_len = pool_len[segs]
    offsets = np.zeros(len(segs) + 1, dtype=np.int64)
    np.cumsum(seg_len.sum(axis=1), out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    idx_type = np.int32 if len(pool.tokens) < 2**31 else np.int64
    ramp = np.arange(max(_TOKENS_PER_CHUNK, int(seg_len.sum(axis=1).max(initial=0))), dtype=idx_type)
    starts = pool.offsets[:-1]
    r0 = 0
    while r0 < len(segs):
        r1 = max(r0 + 1, int(np.searchsorted(offsets, offsets[r0] + _TOKENS_PER_CHUNK, side="right")) - 1)
        sizes = seg_len[r0:r1].ravel()
        n = int(offsets[r1] - offsets[r0])
        # pool index of the output's token j: j + (piece start - output start of the piece)
        delta = (starts[segs[r0:r1].ravel()] - (np.cumsum(sizes) - sizes)).astype(idx_type)
        idx = np.repeat(delta, sizes)
        idx += ramp[:n]
        np.take(pool.tokens, idx, out=out[offsets[r0] : offsets[r1]])
        r0 = r1
    return TokenTable(out, offsets)


# ------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    tokens: TokenTable  # rows in (shuffled) input order
    max_tokens: np.ndarray  # int64 [rows]

    def __len__(self) -> int:
        return len(self.tokens)

    def texts(self, vocab_words: Sequence[str] | None = None) -> list[str]:
        """Every prompt as its words joined by spaces (``vocab_words``: a string per lexicon word; default
        the synthetic lexicon's words). Decoded from the tokens, so it is exactly the same prompts."""
        lex = lexicon()
        words = np.asarray(lex.words if vocab_words is None else list(vocab_words), dtype=object)
        word_ids = lex.token_word[self.tokens.tokens]
        starts = word_ids >= 0
        ends = np.r_[0, np.cumsum(starts)][self.tokens.offsets]  # word positions of the row boundaries
        flat = words[word_ids[starts]].tolist()
        return [" ".join(flat[a:b]) for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]


def _lognormal_int(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def make(name: str, scale: float = 1.0, rows: int | None = None, seed: int = 0) -> Workload:
    """The workload ``name`` with ``rows`` rows (default ``round(base rows * scale)``), deterministic in seed."""
    if name not in BASE_ROWS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(NAMES)}")
    n = max(1, round(BASE_ROWS[name] * scale)) if rows is None else int(rows)
    if n < 0:
        raise ValueError("rows must be >= 0")
    rng = np.random.default_rng([seed, NAMES.index(name)])
    i = np.arange(n, dtype=np.int64)
    if name == "fewshot":  # piece 0: the instruction block; piece 1 + r: row r's input
        words = np.r_[1200, rng.integers(30, 301, n)]
        segs = np.stack([np.zeros(n, np.int64), 1 + i], axis=1)
        max_tokens = rng.integers(4, 33, n)
    elif name == "templates":  # pieces 0..15: templates; 16 + r: row r's question
        n_tpl = 16
        words = np.r_[rng.integers(100, 1501, n_tpl), rng.integers(20, 501, n)]
        segs = np.stack([i % n_tpl, n_tpl + i], axis=1)
        max_tokens = _lognormal_int(rng, n, 128, _OUT_SIGMA, 16, 512)
    elif name == "rag":  # piece 0: system prompt; 1..D: documents; 1 + D + r: row r's question
        n_doc = -(-n // 16)
        words = np.r_[200, rng.integers(400, 1201, n_doc), rng.integers(10, 41, n)]
        segs = np.stack([np.zeros(n, np.int64), 1 + i // 16, 1 + n_doc + i], axis=1)
        max_tokens = rng.integers(32, 257, n)
    else:  # noshare
        words = _lognormal_int(rng, n, 300, _NOSHARE_PROMPT_SIGMA, 16, 2000)
        segs = i[:, None]
        max_tokens = _lognormal_int(rng, n, 150, _OUT_SIGMA, 8, 1024)
    perm = rng.permutation(n)
    pool = _tokenize_pieces(words, rng)
    return Workload(name, _assemble(pool, segs[perm]), max_tokens[perm].astype(np.int64))


def make_texts(name: str, rows: int | None = None, seed: int = 0, scale: float = 1.0) -> list[str]:
    """The same prompts as ``make(name, scale, rows, seed)``, as text (words joined by spaces)."""
    return make(name, scale=scale, rows=rows, seed=seed).texts()


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="name", help=f"workloads (default: all of {', '.join(NAMES)})")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in args.names:
        if name not in BASE_ROWS:
            ap.error(f"unknown workload {name!r}")
    lexicon()  # built once; not part of a workload's time
    print(f"{'workload':<10} {'rows':>9} {'prompt tokens':>14} {'tokens/row':>11} {'max_tokens':>11} {'time s':>8}")
    for name in args.names or NAMES:
        t0 = time.perf_counter()
        w = make(name, scale=args.scale, rows=args.rows, seed=args.seed)
        dt = time.perf_counter() - t0
        mean = w.tokens.num_tokens / max(len(w), 1)
        print(f"{name:<10} {len(w):>9} {w.tokens.num_tokens:>14,} {mean:>11.1f} {int(w.max_tokens.sum()):>11,} "
              f"{dt:>8.3f}")


if __name__ == "__main__":
    main()
