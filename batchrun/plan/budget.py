"""KV memory admission (memory-centric token batching with Past-Future's projected peak).

Admitting work is capped by KV memory, not by a request count: a set of running rows fits if the *future
peak* of its KV fits. Sort the running rows by estimated remaining output, largest first; just before row i
finishes, rows 0..i are all alive and each has grown by remaining_i, so

    peak = max_i ( sum_{j<=i} current_j + (i + 1) * remaining_i )

Shared prefix KV (held once per live prefix) comes on top. Sizes are in tokens, each row and prefix rounded
up to whole KV blocks. The engine's scheduler and the plan simulator both admit through ``fits``.
"""

from __future__ import annotations

import numpy as np


def blocks(tokens: np.ndarray | int, block_size: int) -> np.ndarray | int:
    return -(-np.asarray(tokens) // block_size) if isinstance(tokens, np.ndarray) else -(-tokens // block_size)


def round_up(tokens: int, block_size: int) -> int:
    """``tokens`` rounded up to whole blocks, in tokens."""
    return -(-tokens // block_size) * block_size


def projected_peak(current: np.ndarray, remaining: np.ndarray, block_size: int = 1) -> int:
    """Future peak KV tokens of rows holding ``current`` tokens that will grow by ``remaining`` more."""
    if len(current) == 0:
        return 0
    order = np.argsort(-remaining, kind="stable")
    cur = np.cumsum(current[order])
    rem = remaining[order]
    peak = cur + (np.arange(1, len(rem) + 1)) * rem
    # Block rounding: each row may waste up to block_size - 1 tokens in its last block.
    return int(peak.max()) + (block_size - 1) * len(current)


def fits(current: np.ndarray, remaining: np.ndarray, prefix_tokens: int, budget: int, block_size: int = 1) -> bool:
    return projected_peak(current, remaining, block_size) + prefix_tokens <= budget
