"""The flash varlen backend (CUDA, half precision): every sequence of the step in one ``varlen_attn`` call.

Each sequence's context (its shared prefixes' segments and its own) is gathered from the pool into one
packed key/value buffer per layer. (Reading a shared prefix once for all its members is a separate,
cascade backend.)
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from batchrun.engine.attention.base import AttentionBackend, context_slots
from batchrun.engine.step import Step


def available(device: str, dtype: torch.dtype) -> bool:
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


class VarlenBackend(AttentionBackend):
    name = "varlen"

    def prepare(self, step: Step) -> None:
        dev = self.device
        contexts = context_slots(step)
        cu_k = [0, *itertools.accumulate(len(c) for c in contexts)]
        ints = np.concatenate([np.asarray(step.slot_mapping, dtype=np.int64), np.concatenate(contexts)])
        ints = torch.from_numpy(ints).to(dev, non_blocking=True)
        t = step.num_tokens
        self.slots, self.context = ints[:t], ints[t:]
        offsets = torch.tensor([step.query_start, cu_k], dtype=torch.int32).to(dev, non_blocking=True)
        self.cu_q, self.cu_k = offsets[0], offsets[1]
        self.max_q = max(len(s.tokens) for s in step.seqs)
        self.max_k = max(len(c) for c in contexts)

    def forward(self, query, key, value, layer, scaling):
        from torch.nn.attention.varlen import varlen_attn

        k_pool, v_pool = self.write_kv(key, value, layer)
        # Flash's causal mask is aligned to the end of each context: exactly "query i sees keys <= n - t + i".
        o = varlen_attn(query[0].transpose(0, 1), k_pool[self.context], v_pool[self.context], self.cu_q, self.cu_k,
                        self.max_q, self.max_k, scale=scaling, window_size=(-1, 0))
        return o.unsqueeze(0)
