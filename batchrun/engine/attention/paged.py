"""The paged (cascade) backend: the KV pool is read in place, and each shared prefix once per step for all the
sequences of the step under it (Hydragen / BatchLLM's horizontal fusion), at every level of the trie.

``prepare`` turns the step into the items of ``paged_kernel``: one item per sequence for its own level
(causal) and one per distinct shared-prefix level in the step (the queries of every sequence under it
stacked, non-causal). Per layer, three launches: the new K/V into the pool, one attention launch for every
item, and the merge — a query with several items (its prefixes, then its own tokens) gets its parts combined
exactly by log-sum-exp. Needs Triton (the GPU machine has it); runs on the CPU only through Triton's
interpreter (``TRITON_INTERPRET=1``), which the tests use.

Decode steps can be captured in CUDA graphs (``prepare_graph``): the step's metadata then goes to static
buffers of fixed shapes (padded: spare tiles name an empty item, spare tokens write their K/V to the pool's
spare slot and are never read).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from batchrun.engine.attention.base import AttentionBackend
from batchrun.engine.step import Step
from batchrun.errors import RuntimeFailure


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class _Layout:
    """A step's kernel metadata as host arrays (int32), built once per step."""

    tokens: int
    depth: int  # most shared levels of any token
    rows: np.ndarray  # [P] the token of each part row (own items first: part row t is token t)
    items: np.ndarray  # [5, I] row0, nrows, table0, klen, causal
    table: np.ndarray  # block ids of every item, concatenated
    tiles: np.ndarray  # [2, tiles] item of each program, its first row in the item (narrow tiles)
    wide: np.ndarray  # [2, tiles] the same for wide tiles (shared levels under many rows)
    parts: np.ndarray  # [tokens, depth] each token's shared-level part rows (-1: none)
    slots: np.ndarray  # [tokens] pool slot of each new token's K/V


ALIGN = 4  # int32 elements (16 bytes): Triton specializes a kernel on its pointers' alignment, so every
# metadata array starts aligned (else steps would compile new variants of the kernels, at random)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Meta:
    """Views of one flat int32 buffer (host or device) holding a step's metadata: rows [P], items [5, I],
    table, narrow and wide tiles [2, n], parts [tokens * depth], slots [tokens]; ``shapes`` gives each
    one's (rows, columns), every row starting 16-byte aligned."""

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, int]], tokens: int, depth: int):
        views, off = [], 0
        for r, c in shapes:
            views.append(flat[off : off + r * _padded(c)].view(r, _padded(c))[:, :c])
            off += r * _padded(c)
        rows, items, table, tiles, wide, parts, slots = views
        self.rows, self.table, self.parts, self.slots = rows[0], table[0], parts[0], slots[0]
        self.item_row0, self.item_nrows, self.item_table0, self.item_klen, self.item_causal = items
        self.tile_item, self.tile_row = tiles
        self.wide_item, self.wide_row = wide
        self.tokens, self.depth, self.num_parts = tokens, depth, shapes[0][1]

    @staticmethod
    def size(shapes: list[tuple[int, int]]) -> int:
        return sum(r * _padded(c) for r, c in shapes)

    def fill(self, lay: _Layout, pad_slot: int) -> None:
        """Write ``lay`` into these (host) views; spare capacity gets empty items, tiles that name the last
        (empty) item, no shared parts, and the spare slot."""
        p, i = len(lay.rows), lay.items.shape[1]
        self.rows[:p] = torch.from_numpy(lay.rows)
        for dst, src in zip((self.item_row0, self.item_nrows, self.item_table0, self.item_klen, self.item_causal),
                            lay.items):
            dst[:i] = torch.from_numpy(src)
            dst[i:] = 0
        self.table[: len(lay.table)] = torch.from_numpy(lay.table)
        empty = len(self.item_row0) - 1
        for item, row, tiles in ((self.tile_item, self.tile_row, lay.tiles), (self.wide_item, self.wide_row, lay.wide)):
            n = tiles.shape[1]
            item[:n], row[:n] = torch.from_numpy(tiles[0]), torch.from_numpy(tiles[1])
            item[n:], row[n:] = empty, 0
        if self.depth:
            self.parts.fill_(-1)
            self.parts.view(self.tokens, self.depth)[: lay.tokens, : lay.depth] = torch.from_numpy(lay.parts)
        self.slots[: lay.tokens] = torch.from_numpy(lay.slots)
        self.slots[lay.tokens :] = pad_slot


class PagedBackend(AttentionBackend):
    name = "paged"
    graphs = True
    BLOCK_N = 64  # keys per inner tile
    # A tile's query rows: tokens x the query heads of one KV head (16 rows of a matrix product). Shared levels
    # under many rows take wide tiles: their keys are read once per WIDE_ROWS rows. Measured on the H200 (1b,
    # benchmarks/results/suite-h200.jsonl): 128 gave fewshot 2.30 s against 2.76 s with 16 (no wide tiles).
    TILE_ROWS = 16
    WIDE_ROWS = 128  # (or BATCHRUN_PAGED_WIDE_ROWS, read as a backend is made)
    # A sequence's own (causal) level over at least a wide tile's rows in wide tiles too, the rest of its rows
    # in narrow ones (BATCHRUN_PAGED_WIDE_CAUSAL=0: all in narrow ones). Measured with
    # benchmarks/paged_tiles.py (1b fewshot 0.25, benchmarks/results/paged-tiles-h200.jsonl): the prefill
    # steps' attention took less time with it in 37 of 40 paired settings of the other knobs (three sweeps),
    # 10% less by the median.
    WIDE_CAUSAL = True
    # Knobs measured there without a clear winner: software pipelining stages of the key loop (None: Triton's
    # default); warps of a wide tile.
    NUM_STAGES: int | None = None
    WIDE_WARPS = 8

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int | None = None):
        super().__init__(k_pool, v_pool, heads)
        if k_pool.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeFailure("BATCHRUN_ATTENTION=paged needs a CUDA device (or TRITON_INTERPRET=1 to run "
                                 "its Triton kernel in the interpreter, for tests)")
        self.group = self.heads // k_pool.shape[2]
        self.group_p2 = triton_pow2(self.group)  # (the kernel's row tiles: a power of two)
        self.dim_p2 = max(triton_pow2(k_pool.shape[3]), 16)  # the head size, padded alike (tl.dot: >= 16)
        self.block_m = max(self.TILE_ROWS // self.group_p2, 1)  # tokens per tile
        wide_rows = _env_setting("BATCHRUN_PAGED_WIDE_ROWS", self.WIDE_ROWS, "a whole number of rows >= 1")
        self.wide_m = max(wide_rows // self.group_p2, self.block_m)
        self.wide_causal = bool(_env_setting("BATCHRUN_PAGED_WIDE_CAUSAL", int(self.WIDE_CAUSAL), "0 or 1", 1))
        self.pad_slot = k_pool.shape[1] - 1  # the pool's spare slot (the allocator never hands it out)
        self.block_size = 16  # (the step's: set by prepare)
        self._static: dict[tuple[int, int], tuple[list, torch.Tensor, _Meta]] = {}
        self.meta: _Meta | None = None

    # -- describing a step ---------------------------------------------------------------------------------

    def _layout(self, step: Step, wide_causal: bool = False) -> _Layout:
        bs, qs = step.block_size, step.query_start
        self.block_size = bs
        tokens = qs[-1]
        n = len(step.seqs)
        row0, nrows = qs[:-1], [qs[i + 1] - qs[i] for i in range(n)]
        table0, klen, table = [], [], []
        # A shared level (the scheduler hands out one object per prefix and step) -> [level, its depth,
        # sequences under it...]
        shared: dict[int, list] = {}
        depth = 0
        for i, seq in enumerate(step.seqs):
            own = seq.levels[-1]
            table0.append(len(table))
            table.extend(own.blocks[: -(-own.length // bs)])
            klen.append(own.length)
            if len(seq.levels) > 1:
                depth = max(depth, len(seq.levels) - 1)
                for j, level in enumerate(seq.levels[:-1]):
                    group = shared.get(id(level))
                    if group is None:
                        shared[id(level)] = [level, j, i]
                    else:
                        group.append(i)
        causal = [1] * n
        rows = list(range(tokens))  # own items first: one part row per token, in token order
        parts = np.full((tokens, depth), -1, dtype=np.int32)
        for level, j, *seq_ids in shared.values():
            first = len(rows)
            for i in seq_ids:
                rows.extend(range(qs[i], qs[i + 1]))
            row0.append(first)
            nrows.append(len(rows) - first)
            table0.append(len(table))
            table.extend(level.blocks[: -(-level.length // bs)])
            klen.append(level.length)
            causal.append(0)
            parts[rows[first:], j] = np.arange(first, len(rows), dtype=np.int32)
        items = np.asarray([row0, nrows, table0, klen, causal], dtype=np.int32)
        # Each item's rows [0, wide_rows) in wide tiles, the rest in narrow ones: a shared level under at least
        # a wide tile's rows all in wide tiles; a causal one (``wide_causal``) its whole wide tiles' worth.
        nrows = items[1]
        wide_rows = np.zeros_like(nrows)
        if self.wide_m > self.block_m:
            wide_rows = np.where((items[4] == 0) & (nrows >= self.wide_m), nrows, wide_rows)
            if wide_causal:
                wide_rows = np.where(items[4] != 0, nrows // self.wide_m * self.wide_m, wide_rows)
        return _Layout(tokens, depth, np.asarray(rows, dtype=np.int32), items, np.asarray(table, dtype=np.int32),
                       _tiles(wide_rows, nrows, self.block_m), _tiles(np.zeros_like(nrows), wide_rows, self.wide_m),
                       parts, np.asarray(step.slot_mapping, dtype=np.int32))

    def prepare(self, step: Step, tokens: int | None = None) -> None:
        """``tokens``: the step padded to this many tokens. A spare token writes its K/V to the spare slot and
        has no shared parts; the merge reads its own part row (another token's shared part, or a row never
        written) and writes only the spare token's output, which nothing reads."""
        lay = self._layout(step, self.wide_causal)
        n = max(tokens or 0, lay.tokens)
        shapes = [(1, max(len(lay.rows), n)), lay.items.shape, (1, len(lay.table)), lay.tiles.shape,
                  lay.wide.shape, (1, n * lay.depth), (1, n)]
        host = self._host_buffer(_Meta.size(shapes))
        _Meta(host, shapes, n, lay.depth).fill(lay, self.pad_slot)
        self.meta = _Meta(host.to(self.device, non_blocking=True), shapes, n, lay.depth)

    def _host_buffer(self, size: int) -> torch.Tensor:
        """A host buffer for one step's metadata: pinned on a GPU (copied without waiting; the caching host
        allocator does not hand the block out again before the copy is done, so the next step, prepared
        while this one runs, never overwrites it)."""
        return torch.zeros(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")

    # -- CUDA graphs (decode steps) ------------------------------------------------------------------------

    def graph_capacity(self, tokens: int, depth: int) -> tuple[int, int, int, int, int]:
        """Fixed shapes of a graph for ``tokens`` decode tokens under at most ``depth`` shared levels: part
        rows, items (the last one empty, for spare tiles), table entries (every pool block at most once),
        narrow tiles, wide tiles."""
        parts = tokens * (1 + depth)
        tiles = tokens + depth * (tokens // self.block_m + 64)
        wide = depth * (tokens // self.wide_m + 16) if self.wide_m > self.block_m else 0
        return parts, parts + 1, self.k_pool.shape[1] // self.block_size + 1, tiles, wide

    def prepare_graph(self, step: Step, tokens: int, depth: int) -> bool:
        """Lay a decode step out in the static buffers of the graph for (``tokens``, ``depth``); False if it
        does not fit them (then it runs eagerly)."""
        lay = self._layout(step)
        cap_parts, cap_items, cap_table, cap_tiles, cap_wide = self.graph_capacity(tokens, depth)
        if (lay.tokens > tokens or lay.depth > depth or len(lay.rows) > cap_parts
                or lay.items.shape[1] > cap_items - 1 or len(lay.table) > cap_table
                or lay.tiles.shape[1] > cap_tiles or lay.wide.shape[1] > cap_wide):
            return False
        key = (tokens, depth)
        if key not in self._static:
            shapes = [(1, cap_parts), (5, cap_items), (1, cap_table), (2, cap_tiles), (2, cap_wide),
                      (1, tokens * depth), (1, tokens)]
            flat = torch.zeros(_Meta.size(shapes), dtype=torch.int32, device=self.device)
            self._static[key] = (shapes, flat, _Meta(flat, shapes, tokens, depth))
        shapes, flat, meta = self._static[key]
        host = self._host_buffer(flat.numel())  # (a fresh one: the last step's copy may not have run yet)
        _Meta(host, shapes, tokens, depth).fill(lay, self.pad_slot)
        flat.copy_(host, non_blocking=True)
        self.meta = meta
        return True

    # -- the forward pass ----------------------------------------------------------------------------------

    def forward(self, query, key, value, layer, scaling):
        from batchrun.engine.attention.paged_kernel import merge_kernel, paged_attention_kernel, store_kv_kernel

        m = self.meta
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, KVH, D], views
        store_kv_kernel[(m.tokens,)](k, v, k_pool, v_pool, m.slots, k.stride(0), k.stride(1), v.stride(0),
                                     v.stride(1), k_pool.stride(0), k_pool.stride(1), KVH=kv_heads,
                                     BLOCK_H=triton_pow2(kv_heads), D=dim, DP=self.dim_p2)
        q = query[0].transpose(0, 1)  # [T, H, D], a view
        out = torch.empty(m.num_parts, heads, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(m.num_parts, heads, dtype=torch.float32, device=q.device)
        for tile_item, tile_row, block_m in ((m.tile_item, m.tile_row, self.block_m),
                                             (m.wide_item, m.wide_row, self.wide_m)):
            if not len(tile_item):
                continue
            paged_attention_kernel[(len(tile_item), kv_heads)](
                q, k_pool, v_pool, out, lse, m.rows, m.item_row0, m.item_nrows, m.item_table0, m.item_klen,
                m.item_causal, m.table, tile_item, tile_row,
                scaling if scaling is not None else 1.0 / math.sqrt(dim), q.stride(0), q.stride(1),
                k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1), lse.stride(0), G=self.group,
                GP=self.group_p2, D=dim, DP=self.dim_p2, BLOCK_M=block_m, BLOCK_N=self.BLOCK_N,
                PAGE=self.block_size,
                IEEE=k_pool.dtype == torch.float32, INTERPRET=interpret,
                num_warps=4 if block_m * self.group_p2 <= 64 else self.WIDE_WARPS,
                **({} if self.NUM_STAGES is None else {"num_stages": self.NUM_STAGES}))
        final = torch.empty(m.tokens, heads, dim, dtype=query.dtype, device=q.device)
        merge_kernel[(m.tokens,)](out, lse, m.parts, final, out.stride(0), out.stride(1), lse.stride(0),
                                  final.stride(0), final.stride(1), H=heads, BLOCK_H=triton_pow2(heads), D=dim,
                                  DP=self.dim_p2, L=m.depth)
        return final.unsqueeze(0)


def _env_setting(name: str, default: int, expected: str, most: int | None = None) -> int:
    """The environment variable ``name`` as a whole number >= 1 (or 0 .. ``most`` where ``most`` is given),
    else ``default``; anything else is refused, naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or (int(raw) > most if most is not None else int(raw) < 1):
        raise RuntimeFailure(f"{name}={raw!r}: expected {expected}")
    return int(raw)


def triton_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tiles(start: np.ndarray, end: np.ndarray, block_m: int) -> np.ndarray:
    """[2, tiles]: for each program, its item and its first row in the item — item i's rows [start[i], end[i])
    in tiles of ``block_m`` rows (none where end <= start)."""
    counts = np.maximum(-(-(end.astype(np.int64) - start) // block_m), 0)
    item = np.repeat(np.arange(len(end)), counts)
    first = np.repeat(start.astype(np.int64), counts) + (
        np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)) * block_m
    return np.stack([item, first]).astype(np.int32)
