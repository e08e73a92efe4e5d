"""The KV manager: owns the pool's blocks, the shared prefixes' segments and who still needs them (no torch).

The scheduler asks it whether work fits (``fits``), opens a shared prefix's segment (``share``), grows
segments (``allocate``), lets rows and members go (``release_row``, ``release_member``) and, when nothing
else can free memory, evicts shared prefixes that nobody running needs (``evict``; they are recomputed for
their members later). A shared prefix is freed when its last member lets go of it. Sizes are in tokens,
counted in whole blocks as the pool holds them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from batchrun.engine.blocks import BlockAllocator, Segment
from batchrun.plan.budget import fits, round_up
from batchrun.plan.groups import PrefixGroups


class KVManager:
    def __init__(self, prefixes: PrefixGroups, num_blocks: int, block_size: int):
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.budget = num_blocks * block_size  # tokens
        self._size = (prefixes.end - prefixes.start).tolist()  # tokens of each shared prefix
        self._refs = prefixes.members.astype(np.int64).tolist()  # members that still need each prefix
        self._segs: dict[int, Segment] = {}  # shared prefixes whose KV is held (or being computed)
        self.failed: set[int] = set()  # shared prefixes that cannot fit even alone
        self.evictions = 0

    # -- asking ------------------------------------------------------------------------------------------

    @property
    def used_tokens(self) -> int:
        return self.alloc.used_tokens

    def holds(self, p: int) -> bool:
        return p in self._segs

    def segment(self, p: int) -> Segment | None:
        return self._segs.get(p)

    def prefix_tokens(self) -> int:
        """Whole-block tokens of every shared prefix held now (at their full size)."""
        return sum(round_up(self._size[p], self.block_size) for p in self._segs)

    def fits(self, current: list[int], remaining: list[int], extra_prefix: int | None = None) -> bool:
        """Does the projected future peak of rows holding ``current`` tokens that will grow by ``remaining``,
        plus the held shared prefixes (and prefix ``extra_prefix``, if given), fit the pool?"""
        prefix = self.prefix_tokens()
        if extra_prefix is not None:
            prefix += round_up(self._size[extra_prefix], self.block_size)
        return fits(np.array(current, dtype=np.int64), np.array(remaining, dtype=np.int64), prefix, self.budget,
                    self.block_size)

    # -- changing ----------------------------------------------------------------------------------------

    def share(self, p: int) -> Segment:
        """Open shared prefix ``p``'s segment (empty: its KV is computed into it next)."""
        seg = self._segs[p] = Segment()
        return seg

    def allocate(self, seg: Segment, n: int) -> list[int] | None:
        """Slots for ``n`` more tokens of ``seg``; None (nothing changed) if the pool has too few blocks."""
        return self.alloc.reserve(seg, n)

    def release_row(self, seg: Segment) -> None:
        """A row's own KV is no longer needed (it finished, failed or was preempted)."""
        self.alloc.free(seg)

    def release_member(self, chain: Iterable[int]) -> list[int]:
        """A member of the prefixes in ``chain`` is done with them; returns the prefixes freed (no member
        needs them any more)."""
        freed = []
        for p in chain:
            self._refs[p] -= 1
            if self._refs[p] == 0 and p in self._segs:
                self.alloc.free(self._segs.pop(p))
                freed.append(p)
        return freed

    def fail(self, p: int) -> None:
        """Shared prefix ``p`` cannot fit even alone: drop what it holds; its members fail as they come."""
        self.failed.add(p)
        seg = self._segs.pop(p, None)
        if seg is not None:
            self.alloc.free(seg)

    def evict(self, in_use: set[int]) -> bool:
        """Free every held shared prefix not in ``in_use``; True if any was freed."""
        idle = [p for p in self._segs if p not in in_use]
        for p in idle:
            self.alloc.free(self._segs.pop(p))
        self.evictions += len(idle)
        return bool(idle)
