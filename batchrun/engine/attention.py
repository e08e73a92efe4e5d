"""batchrun's attention for transformers models: packed queries over a paged, prefix-shared KV pool.

transformers' attention layers call the registered function ``"batchrun"`` with q, k, v after rotary
embedding. The model runs on one packed row: the new tokens of every sequence in the step, positions
restarting per sequence. This function writes the new k, v into the pool (``StepContext.slots``), then lets
each sequence's queries attend, causally, to its context: its shared prefixes' segments and its own.
Attention over several segments is exactly one softmax over their concatenation; here (the plain-torch path
that runs everywhere) the segments are gathered and concatenated. Faster GPU paths read a shared prefix once
for all its members and merge the parts by log-sum-exp.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_LOCAL = threading.local()
NAME = "batchrun"


@dataclass
class SeqSpan:
    """One sequence's share of a step: queries ``[q_start, q_end)`` of the packed row."""

    q_start: int
    q_end: int
    context_slots: torch.Tensor  # int64 [context tokens]: pool slots of every token it attends to, in order
    mask: torch.Tensor | None = None  # bool [t, context tokens]: causal, offset to the context's end

    def __post_init__(self) -> None:
        if self.mask is None:
            t, n = self.q_end - self.q_start, len(self.context_slots)
            # Query i sits at context position n - t + i and sees keys 0 .. n - t + i.
            self.mask = torch.ones(t, n, dtype=torch.bool, device=self.context_slots.device).tril(diagonal=n - t)


@dataclass
class DecodeBatch:
    """Sequences with one new token each, attended in one padded call."""

    q_index: torch.Tensor  # int64 [S]: their query positions in the packed row
    context_slots: torch.Tensor  # int64 [S, N]: pool slots of each one's context, padded
    valid: torch.Tensor  # bool [S, N]: which of those are real


@dataclass
class VarlenBatch:
    """Every sequence of the step in one flash varlen call (GPU, half precision)."""

    cu_q: torch.Tensor  # int32 [S + 1]: query offsets in the packed row
    cu_k: torch.Tensor  # int32 [S + 1]: offsets of each one's context in ``context_slots``
    max_q: int
    max_k: int
    context_slots: torch.Tensor  # int64 [sum of context lengths]


@dataclass
class StepContext:
    k_pool: torch.Tensor  # [layers, slots, kv_heads, head_dim]
    v_pool: torch.Tensor
    slots: torch.Tensor  # int64 [T]: where each new token's k, v go
    spans: list[SeqSpan]  # sequences with several new tokens (prefill)
    decode: DecodeBatch | None = None
    varlen: VarlenBatch | None = None  # when set, it covers every sequence (spans and decode are empty)


class use_step:
    """Context manager: the step whose attention the model's layers compute."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def __enter__(self) -> StepContext:
        _LOCAL.ctx = self.ctx
        return self.ctx

    def __exit__(self, *exc) -> None:
        _LOCAL.ctx = None


def batchrun_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, T, D]; key, value [1, KVH, T, D]. Returns ([1, T, H, D], None).

    Outside a batchrun step (e.g. the reference engine's ``generate`` on the same model) it is plain SDPA.
    """
    ctx: StepContext | None = getattr(_LOCAL, "ctx", None)
    if ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = module.layer_idx
    k_pool, v_pool = ctx.k_pool[layer], ctx.v_pool[layer]
    k_pool[ctx.slots] = key[0].transpose(0, 1).to(k_pool.dtype)
    v_pool[ctx.slots] = value[0].transpose(0, 1).to(v_pool.dtype)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    group = heads // kv_heads
    if ctx.varlen is not None:
        from torch.nn.attention.varlen import varlen_attn

        b = ctx.varlen
        # Flash's causal mask is aligned to the end of each context: exactly "query i sees keys <= n - t + i".
        o = varlen_attn(query[0].transpose(0, 1), k_pool[b.context_slots], v_pool[b.context_slots], b.cu_q, b.cu_k,
                        b.max_q, b.max_k, scale=scaling, window_size=(-1, 0))
        return o.unsqueeze(0), None
    out = query.new_empty(1, query.shape[2], heads, dim)
    if ctx.decode is not None:
        d = ctx.decode
        s = len(d.q_index)
        # Grouped-query attention without copying K/V: a KV head's query group is its query "length".
        q = query[0, :, d.q_index].transpose(0, 1).reshape(s, kv_heads, group, dim)
        k = k_pool[d.context_slots].transpose(1, 2).to(q.dtype)  # [S, KVH, N, D]
        v = v_pool[d.context_slots].transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=d.valid[:, None, None, :], scale=scaling)
        out[0, d.q_index] = o.reshape(s, heads, dim)
    for span in ctx.spans:
        t = span.q_end - span.q_start
        q = query[0, :, span.q_start : span.q_end].reshape(kv_heads, group * t, dim)
        k = k_pool[span.context_slots].transpose(0, 1).to(q.dtype)  # [KVH, n, D]
        v = v_pool[span.context_slots].transpose(0, 1).to(q.dtype)
        mask = span.mask.repeat(group, 1) if group > 1 else span.mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [KVH, G*t, D]
        out[0, span.q_start : span.q_end] = o.reshape(heads, t, dim).transpose(0, 1)
    return out, None


def _mask(*args, **kwargs):
    """No mask inside a batchrun step (spans say who sees what); SDPA's mask outside one."""
    if getattr(_LOCAL, "ctx", None) is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make ``attn_implementation="batchrun"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, batchrun_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
