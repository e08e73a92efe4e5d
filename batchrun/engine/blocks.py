"""KV block bookkeeping (no torch): which blocks of the pool are free, and which a segment holds.

A sequence's KV is a list of ``Segment``s: the segments of its shared prefixes (outermost first), then its
own. A segment is a list of block ids plus how many tokens it holds. Who may free a segment (reference
counts of shared prefixes) is the KV manager's business (``engine.kv``), not the allocator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens written


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError("the KV pool cannot have fewer than 0 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._fresh = 0  # blocks 0 .. _fresh - 1 have been handed out at least once
        self._free: list[int] = []  # blocks given back, reused first (the last one given back first)

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self._fresh + len(self._free)

    @property
    def used_tokens(self) -> int:
        return (self._fresh - len(self._free)) * self.block_size

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        self._fresh += 1
        return self._fresh - 1

    def reserve(self, seg: Segment, new_tokens: int) -> list[int] | None:
        """Grow ``seg`` to hold ``new_tokens`` more tokens; the slot of each new token, or None (and ``seg``
        unchanged) if the pool has too few free blocks."""
        bs = self.block_size
        need = -(-(seg.length + new_tokens) // bs) - len(seg.blocks)
        if need > self.free_blocks:
            return None
        for _ in range(need):
            seg.blocks.append(self._take())
        slots = [seg.blocks[p // bs] * bs + p % bs for p in range(seg.length, seg.length + new_tokens)]
        seg.length += new_tokens
        return slots

    def free(self, seg: Segment) -> None:
        """Give ``seg``'s blocks back to the pool; the segment is empty afterwards."""
        self._free.extend(reversed(seg.blocks))
        seg.blocks = []
        seg.length = 0
