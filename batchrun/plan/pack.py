"""Prefill packs: the plan's prefill work cut into packs of at most ``capacity`` tokens.

Work items, in plan order: each shared prefix level once (before its first member), then each row's own
tokens (after its innermost shared prefix). An item longer than ``capacity`` is chunked (SARATHI): chunk
k+1 goes to a later pack than chunk k. Within a window of consecutive items, packs are filled by best-fit
decreasing (Prepacking): largest item first, into the fullest pack it still fits — never into a pack at
or before one holding something it depends on (its prefix, its previous chunk). Packs are produced lazily,
one window at a time, so a million rows never become a million Python objects at once.

A pack is an int64 array of shape (k, 4): ``kind`` (0 row, 1 prefix), ``id`` (row or prefix index),
``start`` and ``end`` (token range of the row's prompt, or of the prefix's representative row).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ROW, PREFIX = 0, 1


def work_items(order: np.ndarray, lengths: np.ndarray, row_prefix: np.ndarray, prefix_parent: np.ndarray,
               prefix_start: np.ndarray, prefix_end: np.ndarray) -> Iterator[tuple[int, int, int, int, int]]:
    """(kind, id, start, end, depends_on_prefix) in plan order; depends_on_prefix is -1 for none."""
    done = np.zeros(len(prefix_start), dtype=bool)
    for row in order.tolist():
        p = int(row_prefix[row])
        chain = []
        while p >= 0 and not done[p]:
            chain.append(p)
            p = int(prefix_parent[p])
        for q in reversed(chain):
            done[q] = True
            yield PREFIX, q, int(prefix_start[q]), int(prefix_end[q]), int(prefix_parent[q])
        own = int(row_prefix[row])
        start = int(prefix_end[own]) if own >= 0 else 0
        yield ROW, row, start, int(lengths[row]), own


def pack_window(items: list[tuple[int, int, int, int, int]], capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing of one window of items (each (kind, id, start, end, depends_on_prefix)).

    Rows are placed largest first; a shared prefix is placed just before its first member is, so prefixes
    are not front-loaded (their KV lives only from their members' window on).
    """
    pieces = []  # [size, kind, id, start, end, dep_prefix, prev_piece]
    prefix_pieces: dict[int, list[int]] = {}
    for kind, ident, start, end, dep in items:
        prev = -1
        for c, s in enumerate(range(start, max(end, start + 1), capacity)):
            e = min(s + capacity, end)
            pieces.append([e - s, kind, ident, s, e, dep if c == 0 else -1, prev])
            prev = len(pieces) - 1
            if kind == PREFIX:
                prefix_pieces.setdefault(ident, []).append(prev)
    bin_of = [-1] * len(pieces)
    room: list[int] = []
    content: list[list[int]] = []

    def earliest(k: int) -> int:
        dep, prev = pieces[k][5], pieces[k][6]
        lo = bin_of[prev] + 1 if prev >= 0 else 0
        if dep >= 0 and dep in prefix_pieces:
            for q in prefix_pieces[dep]:
                if bin_of[q] < 0:
                    place(q)
                lo = max(lo, bin_of[q] + 1)
        return lo

    def place(k: int) -> None:
        lo = earliest(k)
        size = pieces[k][0]
        best = -1
        for b in range(lo, len(room)):
            if room[b] >= size and (best < 0 or room[b] < room[best]):
                best = b
        if best < 0:
            room.append(capacity), content.append([])
            best = len(room) - 1
        room[best] -= size
        content[best].append(k)
        bin_of[k] = best

    rows = [k for k in range(len(pieces)) if pieces[k][1] != PREFIX]
    for k in sorted(rows, key=lambda k: (-pieces[k][0], k)):
        if bin_of[k] < 0:
            chain = []  # earlier chunks of the same row go first
            q = k
            while q >= 0 and bin_of[q] < 0:
                chain.append(q)
                q = pieces[q][6]
            for q in reversed(chain):
                place(q)
    for k in range(len(pieces)):  # prefixes without a member in this window (none in practice)
        if bin_of[k] < 0:
            place(k)
    return [np.array([pieces[k][1:5] for k in sorted(c)], dtype=np.int64).reshape(-1, 4) for c in content]


def packs(items: Iterator[tuple[int, int, int, int, int]], capacity: int, window_packs: int = 8
          ) -> Iterator[np.ndarray]:
    """Pack ``items`` window by window; a window holds about ``window_packs`` packs' worth of tokens."""
    if capacity < 1:
        raise ValueError("pack capacity must be >= 1 token")
    window: list[tuple[int, int, int, int, int]] = []
    tokens = 0
    for item in items:
        window.append(item)
        tokens += max(item[3] - item[2], 1)
        if tokens >= window_packs * capacity:
            yield from pack_window(window, capacity)
            window, tokens = [], 0
    if window:
        yield from pack_window(window, capacity)
