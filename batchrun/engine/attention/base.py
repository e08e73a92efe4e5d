"""An attention backend's whole contract: ``prepare(step)`` once per step, ``forward`` once per layer.

A backend owns how a step's queries read the paged KV pool. ``prepare`` turns the step's plain description
(``engine.step.Step``) into the device tensors it needs; ``forward`` writes the layer's new K/V into the
pool at the step's slots and returns the attention output. Backends never decide what runs: the scheduler
does. Optionally (``graphs = True``) a backend lays decode steps out in static buffers of fixed shapes
(``prepare_graph``), so that the runner can capture the forward pass in a CUDA graph and replay it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from batchrun.engine.step import Step


class AttentionBackend(ABC):
    name: str = ""
    graphs: bool = False  # can lay decode steps out for CUDA graphs (``prepare_graph``)

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int | None = None):
        self.k_pool = k_pool  # [layers, slots, kv_heads, head_dim]; the last slot is spare (never handed out)
        self.v_pool = v_pool
        self.heads = heads or k_pool.shape[2]  # query heads
        self.device = k_pool.device
        self.slots: torch.Tensor | None = None  # int64 [T]: where each new token's K/V go

    @abstractmethod
    def prepare(self, step: Step) -> None:
        """Build this step's device tensors (called once per step, before the forward pass)."""

    def prepare_graph(self, step: Step, tokens: int, depth: int) -> bool:
        """Lay a decode step out in the static buffers of the CUDA graph for ``tokens`` tokens (padded) under at
        most ``depth`` shared levels; False if the backend cannot (the step then runs eagerly)."""
        return False

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                scaling: float | None) -> torch.Tensor:
        """query [1, H, T, D], key/value [1, KVH, T, D] of the step's new tokens -> output [1, T, H, D]."""

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' K/V in the pool; returns the layer's pools."""
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        k_pool[self.slots] = key[0].transpose(0, 1).to(k_pool.dtype)
        v_pool[self.slots] = value[0].transpose(0, 1).to(v_pool.dtype)
        return k_pool, v_pool


def context_slots(step: Step) -> list[np.ndarray]:
    """Per sequence, the pool slot of every token it attends to, in order (its KV levels concatenated)."""
    bs = step.block_size
    offsets = np.arange(bs, dtype=np.int64)
    out = []
    for seq in step.seqs:
        parts = []
        for level in seq.levels:
            blocks = np.asarray(level.blocks[: -(-level.length // bs)], dtype=np.int64)
            parts.append((blocks[:, None] * bs + offsets).reshape(-1)[: level.length])
        out.append(np.concatenate(parts))
    return out
