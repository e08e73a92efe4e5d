"""What one engine step computes, as plain data: the scheduler writes it, the runner and the attention
backend read it (no torch here).

A step is one forward pass over the new tokens of several sequences packed into one row. For each
sequence the step says which tokens it adds (ids, positions, the pool slots their K/V go to), what it
attends to — its KV levels: the segments of its shared prefixes, outermost first, then its own, kept apart
so that a backend can read a shared prefix once for all the sequences under it — and whether a next token
is drawn from its last position.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class RowKey:
    """A request being generated (its index in the engine's request list)."""

    row: int


@dataclass(frozen=True, slots=True)
class PrefixKey:
    """A shared prefix of the plan (its index in ``plan.prefixes``), computed once for all its members."""

    prefix: int


WorkKey = RowKey | PrefixKey


def placeholder(j: int) -> int:
    """The id standing in a step for the token drawn at index ``j`` of the step before it (``sample_keys``),
    when that step was launched but its tokens are not known on the host yet: the runner takes the real
    token from the device. Placeholders are negative; real token ids are not."""
    return -1 - j


class KVLevel(NamedTuple):
    """One segment of a sequence's context: whose it is, its blocks, how many of its tokens are seen. (A
    named tuple: the scheduler makes one per decoding row and step, and a tuple is made fastest.)"""

    owner: WorkKey  # the shared prefix (PrefixKey), or the sequence itself
    # Pool block ids covering ``length`` tokens: the segment's own list, not a copy (a segment only ever
    # appends blocks, and a freed one gets a new list), so ``length`` alone makes the snapshot.
    blocks: Sequence[int]
    length: int


@dataclass(slots=True)
class SeqWork:
    """One sequence's part of a step."""

    key: WorkKey
    tokens: list[int]
    start_pos: int  # position of tokens[0]
    levels: list[KVLevel]  # everything it attends to, outermost first; the last holds the new tokens
    slots: list[int]  # pool slots of the new tokens
    sample: bool  # a next token is drawn from its last position
    decode: bool = False  # the one new token is the row's last output

    @property
    def context_len(self) -> int:
        return sum(level.length for level in self.levels)


@dataclass
class Step:
    """Every sequence of a step, and the flat arrays a forward pass needs (built once)."""

    seqs: list[SeqWork]
    block_size: int
    token_ids: list[int] = field(init=False)  # [T] the packed row
    positions: list[int] = field(init=False)  # [T] positions restart per sequence
    slot_mapping: list[int] = field(init=False)  # [T] pool slot of each new token's K/V
    query_start: list[int] = field(init=False)  # [S + 1] offsets of each sequence's tokens in the row
    sample_index: list[int] = field(init=False)  # [R] row positions whose logits are sampled
    sample_keys: list[RowKey] = field(init=False)  # [R] the request each of those belongs to
    waits: bool = field(init=False)  # some token id is a placeholder (drawn by the previous step)

    def __post_init__(self) -> None:
        self.token_ids = [t for s in self.seqs for t in s.tokens]
        self.positions = [p for s in self.seqs for p in range(s.start_pos, s.start_pos + len(s.tokens))]
        self.slot_mapping = [x for s in self.seqs for x in s.slots]
        self.query_start = [0, *itertools.accumulate(len(s.tokens) for s in self.seqs)]
        self.sample_index = [self.query_start[i + 1] - 1 for i, s in enumerate(self.seqs) if s.sample]
        self.sample_keys = [s.key for s in self.seqs if s.sample]
        self.waits = min(self.token_ids, default=0) < 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
