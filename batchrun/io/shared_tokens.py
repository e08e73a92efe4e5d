"""Tokenizing texts that share long beginnings: each shared beginning once, not once per row.

A batch job's prompts often start alike (a system prompt, the same few-shot examples: 1b fewshot's 1,024
prompts are 3.7M tokens, about 90% of them shared), and the prompts stage tokenized every row whole. Here the
texts are sorted, neighbours that share at least ``MIN_SHARED`` characters form a group, and the group's
common beginning is tokenized once; each row's tokens are that beginning's tokens up to a cut, then the
tokens of the rest of its text.

Exact, not approximate: the cut is where a piece of the pre-tokenizer starts (a "word" of the tokenizer's
encoding), at least ``MARGIN`` characters before the common beginning ends. Where the tokenizer has no
normalizer and a byte-level pre-tokenizer (regular-expression splits that look at most a few characters
ahead, and no prefix space) — GPT-2's family: SmolLM2, Llama 3, Qwen — its tokens never cross such a
boundary and every split before the cut is decided by the shared characters, so a text's tokens are the
beginning's tokens up to the cut plus the rest's tokens. Only such tokenizers take this path (read from
the tokenizer's own description), and each group's first and last rows are also tokenized whole and
compared: on any difference the group is tokenized whole.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

MIN_SHARED = 512  # characters two sorted neighbours must share to be grouped
MARGIN = 64  # characters kept between the cut and the end of the shared beginning
MIN_SAVED = 32  # tokens a group's cut must save per row to be worth it
MAX_DEPTH = 8  # levels of grouping within groups (rows that each extend the one before would go as deep as
# there are rows: deeper levels are tokenized whole)

Encode = Callable[[list[str]], list[list[int]]]


def encode_shared(backend: Any, texts: list[str], add_special_tokens: bool, encode: Encode) -> list[list[int]]:
    """Token ids of ``texts``, as ``encode(texts)`` gives them: the fast tokenizer ``backend``'s ids
    (``add_special_tokens`` as it adds them), tokenizing each group's shared beginning once where the
    tokenizer allows it (above)."""
    if len(texts) < 2 or not _eligible(backend):
        return encode(texts)
    head = _head(backend, texts[0], add_special_tokens)
    if head is None:
        return encode(texts)
    return _encode(backend, texts, head, encode, MAX_DEPTH)


def _encode(backend: Any, texts: list[str], head: list[int], encode: Encode, depth: int) -> list[list[int]]:
    """``encode(texts)``'s ids (each starting with ``head``), groups' beginnings once; the rests of a group's
    texts are grouped again, ``depth`` levels at most (1b rag: a system prompt, then each document under
    it)."""
    groups = _groups(texts) if depth > 0 else []
    plans = []  # (rows, cut character, the beginning's ids up to the cut)
    for rows, shared in groups:
        enc = backend.encode(texts[rows[0]][:shared], add_special_tokens=False)
        offsets = enc.offsets  # (a new list at each access)
        k = _cut(enc.word_ids, offsets, shared - MARGIN)
        if k >= MIN_SAVED:
            plans.append((rows, offsets[k][0], head + enc.ids[:k]))
    if not plans:
        return encode(texts)
    out: list[list[int] | None] = [None] * len(texts)
    grouped = {i for rows, _, _ in plans for i in rows}
    alone = [i for i in range(len(texts)) if i not in grouped]
    checks = [i for rows, _, _ in plans for i in (rows[0], rows[-1])]
    whole = encode([texts[i] for i in alone + checks])
    for i, ids in zip(alone, whole):
        out[i] = ids
    checked = dict(zip(checks, whole[len(alone):]))
    rests = [texts[i][cut:] for rows, cut, _ in plans for i in rows]
    rest_ids = _encode(backend, rests, [], lambda t: encode_plain(backend, t), depth - 1)
    at = 0
    for rows, _, begin in plans:
        got = [begin + rest_ids[at + j] for j in range(len(rows))]
        at += len(rows)
        if got[0] != checked[rows[0]] or got[-1] != checked[rows[-1]]:
            got = encode([texts[i] for i in rows])  # (never expected: the group tokenized whole)
        for i, ids in zip(rows, got):
            out[i] = ids
    return out  # type: ignore[return-value]


def encode_plain(backend: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without the tokenizer's added special tokens, straight through its Rust encoder."""
    if not texts:
        return []
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _groups(texts: list[str]) -> list[tuple[list[int], int]]:
    """Runs of sorted neighbours sharing at least ``MIN_SHARED`` characters: (rows, characters every row of
    the run shares), runs of two rows or more."""
    order = sorted(range(len(texts)), key=texts.__getitem__)
    groups, run, shared = [], [order[0]] if order else [], 0
    for a, b in itertools.pairwise(order):
        n = _common(texts[a], texts[b])
        if n >= MIN_SHARED:
            shared = n if len(run) == 1 else min(shared, n)
            run.append(b)
        else:
            if len(run) > 1:
                groups.append((sorted(run), shared))
            run = [b]
    if len(run) > 1:
        groups.append((sorted(run), shared))
    return groups


def _common(a: str, b: str) -> int:
    """Length of the common beginning of ``a`` and ``b`` (slices compared in C: doubling, then bisection)."""
    hi = min(len(a), len(b))
    k = 64
    while k < hi and a[:k] == b[:k]:
        k *= 2
    lo, hi = (k // 2 if k > 64 else 0), min(k, hi)  # a[:lo] equal (or lo == 0), the answer is in [lo, hi]
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _cut(word_ids: list[int | None], offsets: list[tuple[int, int]], limit: int) -> int:
    """The last token that starts a word (a piece of the pre-tokenizer) at a character <= ``limit``; 0 if
    none."""
    for k in range(len(word_ids) - 1, 0, -1):
        if offsets[k][0] <= limit and word_ids[k] is not None and word_ids[k] != word_ids[k - 1]:
            return k
    return 0


def _eligible(backend: Any) -> bool:
    """No normalizer; a byte-level pre-tokenizer without a prefix space, alone or after regular-expression
    splits (GPT-2's family)."""
    try:
        norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    except Exception:
        return False
    if norm is not None and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return False
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return False
    return all(s.get("type") == "Split" for s in steps[:-1])


def _head(backend: Any, sample: str, add_special_tokens: bool) -> list[int] | None:
    """The ids the tokenizer adds before a text's own (a BOS); None if it adds any elsewhere."""
    if not add_special_tokens:
        return []
    plain = backend.encode(sample, add_special_tokens=False).ids
    full = backend.encode(sample, add_special_tokens=True).ids
    extra = len(full) - len(plain)
    if extra < 0 or full[extra:] != plain:
        return None
    return full[:extra]
