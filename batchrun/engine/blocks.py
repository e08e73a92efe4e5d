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
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return (self.num_blocks - len(self._free)) * self.block_size

    def reserve(self, seg: Segment, new_tokens: int) -> list[int] | None:
        """Grow ``seg`` to hold ``new_tokens`` more tokens; the slot of each new token, or None (and ``seg``
        unchanged) if the pool has too few free blocks."""
        bs = self.block_size
        need = -(-(seg.length + new_tokens) // bs) - len(seg.blocks)
        if need > len(self._free):
            return None
        for _ in range(need):
            seg.blocks.append(self._free.pop())
        slots = [seg.blocks[p // bs] * bs + p % bs for p in range(seg.length, seg.length + new_tokens)]
        seg.length += new_tokens
        return slots

    def free(self, seg: Segment) -> None:
        """Give ``seg``'s blocks back to the pool; the segment is empty afterwards."""
        self._free.extend(reversed(seg.blocks))
        seg.blocks = []
        seg.length = 0
