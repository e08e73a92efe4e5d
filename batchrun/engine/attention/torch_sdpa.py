"""The plain-torch backend: runs everywhere (CPU, fp32: the path the oracle tests check exactly).

Sequences with one new token (decodes) go in one padded ``scaled_dot_product_attention`` call; each
sequence with several new tokens (prefill) gets its own causal call. Each sequence's context is gathered
from the pool (its shared prefixes' segments and its own, concatenated): attention over several segments is
exactly one softmax over their concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchrun.engine.attention.base import AttentionBackend, context_slots
from batchrun.engine.step import Step


@dataclass
class _Span:
    """A sequence with several new tokens: queries ``[q_start, q_end)`` of the packed row."""

    q_start: int
    q_end: int
    context_slots: torch.Tensor  # int64 [n]
    mask: torch.Tensor  # bool [t, n]: query i sits at context position n - t + i and sees keys 0 .. n - t + i


class TorchBackend(AttentionBackend):
    name = "torch"

    def prepare(self, step: Step) -> None:
        dev = self.device
        self.slots = torch.tensor(step.slot_mapping, dtype=torch.long, device=dev)
        self.spans: list[_Span] = []
        single_q, single_ctx = [], []
        for i, ctx in enumerate(context_slots(step)):
            start, end = step.query_start[i], step.query_start[i + 1]
            if end - start == 1:
                single_q.append(start)
                single_ctx.append(ctx)
                continue
            t, n = end - start, len(ctx)
            mask = torch.ones(t, n, dtype=torch.bool, device=dev).tril(diagonal=n - t)
            self.spans.append(_Span(start, end, torch.from_numpy(ctx).to(dev), mask))
        self.decode_q = None
        if single_q:
            width = max(len(c) for c in single_ctx)
            ctx_slots = torch.zeros(len(single_ctx), width, dtype=torch.long)
            valid = torch.zeros(len(single_ctx), width, dtype=torch.bool)
            for i, c in enumerate(single_ctx):
                ctx_slots[i, : len(c)] = torch.from_numpy(c)
                valid[i, : len(c)] = True
            self.decode_q = torch.tensor(single_q, device=dev)
            self.decode_slots, self.decode_valid = ctx_slots.to(dev), valid.to(dev)

    def forward(self, query, key, value, layer, scaling):
        k_pool, v_pool = self.write_kv(key, value, layer)
        heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
        group = heads // kv_heads
        out = query.new_empty(1, query.shape[2], heads, dim)
        if self.decode_q is not None:
            s = len(self.decode_q)
            # Grouped-query attention without copying K/V: a KV head's query group is its query "length".
            q = query[0, :, self.decode_q].transpose(0, 1).reshape(s, kv_heads, group, dim)
            k = k_pool[self.decode_slots].transpose(1, 2).to(q.dtype)  # [S, KVH, N, D]
            v = v_pool[self.decode_slots].transpose(1, 2).to(q.dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.decode_valid[:, None, None, :], scale=scaling)
            out[0, self.decode_q] = o.reshape(s, heads, dim)
        for span in self.spans:
            t = span.q_end - span.q_start
            q = query[0, :, span.q_start : span.q_end].reshape(kv_heads, group * t, dim)
            k = k_pool[span.context_slots].transpose(0, 1).to(q.dtype)  # [KVH, n, D]
            v = v_pool[span.context_slots].transpose(0, 1).to(q.dtype)
            mask = span.mask.repeat(group, 1) if group > 1 else span.mask
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [KVH, G*t, D]
            out[0, span.q_start : span.q_end] = o.reshape(heads, t, dim).transpose(0, 1)
        return out
