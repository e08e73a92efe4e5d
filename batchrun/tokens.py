"""TokenTable: every row's token ids in one flat int32 array plus offsets (no Python int per token).

The prompts stage produces it, the planner reads it, the engine slices it. A million 1.4k-token prompts are
5.6 GB as numpy, but ~40 GB as Python lists of ints: this is why the table is flat.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenTable:
    tokens: np.ndarray  # int32 [total tokens]: row i is tokens[offsets[i]:offsets[i+1]]
    offsets: np.ndarray  # int64 [rows + 1], offsets[0] == 0

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-D and start at 0")
        if self.offsets[-1] != len(self.tokens):
            raise ValueError("offsets[-1] must equal the number of tokens")

    @classmethod
    def from_lists(cls, rows: Iterable[Sequence[int]]) -> TokenTable:
        rows = list(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenTable]) -> TokenTable:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        tokens = np.concatenate([p.tokens for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(tokens, offsets)

    def take(self, rows: np.ndarray) -> TokenTable:
        """A new table of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not len(rows):
            return TokenTable(self.tokens[:0], offsets)
        starts = np.repeat(self.offsets[rows] - offsets[:-1], lengths)
        return TokenTable(self.tokens[starts + np.arange(int(offsets[-1]))], offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def row(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def to_lists(self) -> list[list[int]]:
        return [self.row(i).tolist() for i in range(len(self))]
