"""The paged (cascade) backend: the KV pool is read in place, and each shared prefix once per step for all the
sequences of the step under it (Hydragen / BatchLLM's horizontal fusion), at every level of the trie.

``prepare`` turns the step into the items of ``paged_kernel``: one item per distinct shared-prefix level in the
step (the queries of every sequence under it stacked, non-causal) and one per sequence for its own level
(causal). One kernel launch per layer computes every item; a query that has several items (its prefixes,
then its own tokens) gets its parts merged exactly by log-sum-exp. Needs Triton (the GPU machine has it);
runs on the CPU only through Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import math
import os

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


class PagedBackend(AttentionBackend):
    name = "paged"
    BLOCK_N = 64  # keys per inner tile
    # A tile's query rows (tokens x the heads of one KV head), for items of few rows (decode) and for items of
    # many (prefill, a shared prefix under many sequences). Measured on the H200 (1b, fewshot / rag at 0.25):
    # 16 and 16 gave 4.6 s / 8.2 s, 16 and 128 gave 12.7 s / 13.2 s. BATCHRUN_PAGED_WIDE_ROWS is for tuning.
    NARROW_ROWS = 16
    WIDE_ROWS = int(os.environ.get("BATCHRUN_PAGED_WIDE_ROWS", 16))

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor):
        super().__init__(k_pool, v_pool)
        if k_pool.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeFailure("BATCHRUN_ATTENTION=paged needs a CUDA device (or TRITON_INTERPRET=1 to run "
                                 "its Triton kernel in the interpreter, for tests)")

    def prepare(self, step: Step) -> None:
        bs = step.block_size
        qs = step.query_start
        shared: dict[tuple, list[int]] = {}  # (level owner, length) -> sequences under it
        shared_level = {}
        own = []
        for i, seq in enumerate(step.seqs):
            for level in seq.levels[:-1]:
                key = (level.owner, level.length)
                shared.setdefault(key, []).append(i)
                shared_level[key] = level
            own.append(seq.levels[-1])
        rows, item_row0, item_nrows, item_table0, item_klen, item_causal, table = [], [], [], [], [], [], []
        n_rows = n_table = 0

        def add(seq_ids: list[int], level, causal: int) -> None:
            nonlocal n_rows, n_table
            item_rows = [np.arange(qs[i], qs[i + 1], dtype=np.int32) for i in seq_ids]
            count = sum(len(r) for r in item_rows)
            blocks = level.blocks[: -(-level.length // bs)]
            rows.extend(item_rows)
            item_row0.append(n_rows)
            item_nrows.append(count)
            item_table0.append(n_table)
            item_klen.append(level.length)
            item_causal.append(causal)
            table.append(np.asarray(blocks, dtype=np.int32))
            n_rows += count
            n_table += len(blocks)

        for i, level in enumerate(own):  # first: then part row = token for the own items
            add([i], level, 1)
        for key, seq_ids in shared.items():
            add(seq_ids, shared_level[key], 0)
        self.merge = bool(shared)
        self.num_parts = n_rows
        nrows = np.asarray(item_nrows, dtype=np.int64)
        self._item_nrows = nrows
        ints = [np.concatenate(rows), np.asarray(item_row0, np.int32), nrows.astype(np.int32),
                np.asarray(item_table0, np.int32), np.asarray(item_klen, np.int32), np.asarray(item_causal, np.int32),
                np.concatenate(table) if table else np.zeros(0, np.int32),
                np.asarray(step.slot_mapping, dtype=np.int32)]
        sizes = [len(a) for a in ints]
        flat = torch.from_numpy(np.concatenate(ints).astype(np.int32)).to(self.device, non_blocking=True)
        parts = torch.split(flat, sizes)
        (self.rows, self.item_row0, self.item_nrows, self.item_table0, self.item_klen, self.item_causal,
         self.table, slots) = parts
        self.slots = slots.long()
        self.rows_long = self.rows.long() if self.merge else None  # (for the merge, once per step)
        self.block_size = bs
        self._tiles: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def _tiles_for(self, group: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per launch: (tokens per tile, item of each program, its first row in the item). Items of few rows
        get narrow tiles, the others wide ones (cached per step: every layer has the same heads)."""
        if group not in self._tiles:
            narrow, wide = max(self.NARROW_ROWS // group, 1), max(self.WIDE_ROWS // group, 1)
            is_wide = self._item_nrows > (narrow if wide > narrow else np.iinfo(np.int64).max)
            launches = []
            for block_m, chosen in ((narrow, ~is_wide), (wide, is_wide)):
                items = np.nonzero(chosen)[0].astype(np.int32)
                if not len(items):
                    continue
                counts = -(-self._item_nrows[items] // block_m)
                item = np.repeat(items, counts)
                first = (np.arange(len(item)) - np.repeat(np.cumsum(counts) - counts, counts)) * block_m
                t = torch.from_numpy(np.stack([item, first.astype(np.int32)])).to(self.device, non_blocking=True)
                launches.append((block_m, t[0], t[1]))
            self._tiles[group] = launches
        return self._tiles[group]

    def forward(self, query, key, value, layer, scaling):
        from batchrun.engine.attention.paged_kernel import paged_attention_kernel

        k_pool, v_pool = self.write_kv(key, value, layer)
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
        group = heads // kv_heads
        q = query[0].transpose(0, 1)  # [T, H, D], a view
        out = torch.empty(self.num_parts, heads, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(self.num_parts, heads, dtype=torch.float32, device=q.device)
        for block_m, tile_item, tile_row in self._tiles_for(group):
            paged_attention_kernel[(len(tile_item), kv_heads)](
                q, k_pool, v_pool, out, lse, self.rows, self.item_row0, self.item_nrows, self.item_table0,
                self.item_klen, self.item_causal, self.table, tile_item, tile_row,
                scaling if scaling is not None else 1.0 / math.sqrt(dim),
                q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
                lse.stride(0),
                G=group, D=dim, BLOCK_M=block_m, BLOCK_N=self.BLOCK_N, PAGE=self.block_size,
                IEEE=k_pool.dtype == torch.float32, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
                num_warps=4 if block_m * group <= 64 else 8)
        t = q.shape[0]
        # (Own items come first, one part row per token in token order: alone, they are the output.)
        out = merge_parts(out, lse, self.rows_long, t) if self.merge else out[:t]
        return out.to(query.dtype).unsqueeze(0)


def merge_parts(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """Combine partial attention outputs of the same query token exactly: softmax over all parts' keys is the
    parts' outputs weighted by exp(lse - max lse). out [P, H, D], lse [P, H], rows [P] -> [tokens, H, D]."""
    heads = lse.shape[1]
    top = torch.full((tokens, heads), float("-inf"), device=lse.device).scatter_reduce(
        0, rows[:, None].expand(-1, heads), lse, "amax")
    w = torch.exp(lse - top[rows])
    num = torch.zeros(tokens, heads, out.shape[2], device=out.device).index_add_(0, rows, out * w[..., None])
    den = torch.zeros(tokens, heads, device=out.device).index_add_(0, rows, w)
    return num / den[..., None]
