"""The runner: turns a step's work into one packed forward pass and returns the logits to sample from.
Computes, never decides (the scheduler decides).

All sequences of a step go in one row: token ids concatenated, position ids restarting per sequence, no
padding. The model's attention layers run ``engine.attention`` over the paged KV pool.
"""

from __future__ import annotations

import itertools

import torch

from batchrun.engine import attention
from batchrun.engine.loader import LoadedModel
from batchrun.engine.work import Work
from batchrun.errors import RuntimeFailure


def check_supported(model) -> None:
    """Refuse, with a clear message, models whose attention batchrun cannot own."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise RuntimeFailure(f"engine.backend: {name} does not support custom attention functions in transformers; "
                             "use engine.backend: reference")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention"}:
        raise RuntimeFailure(f"engine.backend: {name} uses {sorted(kinds - {'full_attention'})} layers, which "
                             "batchrun's engine does not implement yet; use engine.backend: reference")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise RuntimeFailure(f"engine.backend: {name} uses sliding-window attention, which batchrun's engine does "
                             "not implement yet; use engine.backend: reference")


def use_varlen(device: str, dtype: torch.dtype) -> bool:
    """Flash varlen attention: CUDA, half precision, and torch's ``varlen_attn`` present.
    ``BATCHRUN_ATTENTION=torch`` forces the plain-torch path (to compare the two)."""
    import os

    if os.environ.get("BATCHRUN_ATTENTION") == "torch":
        return False
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


class Runner:
    def __init__(self, loaded: LoadedModel, num_slots: int):
        model = loaded.model
        check_supported(model)
        model.set_attn_implementation(attention.register())
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dtype = next(model.parameters()).dtype
        shape = (cfg.num_hidden_layers, num_slots, kv_heads, head_dim)
        self.k_pool = torch.empty(shape, dtype=dtype, device=loaded.device)  # only written slots are read
        self.v_pool = torch.empty(shape, dtype=dtype, device=loaded.device)
        self.loaded = loaded
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = loaded.device
        self.use_varlen = use_varlen(loaded.device, dtype)

    @torch.inference_mode()
    def forward(self, works: list[Work], block_size: int) -> torch.Tensor:
        """Run the step; return logits [number of sampling works, vocab], in the order of ``works``."""
        ids, pos, slots, last = [], [], [], []
        q_start, contexts = [], []  # per work: where its queries start in the packed row, its context slots
        for w in works:
            q_start.append(len(ids))
            ids.extend(w.tokens)
            pos.extend(range(w.start_pos, w.start_pos + len(w.tokens)))
            slots.extend(w.slots)
            contexts.append(self._context_slots(w, block_size))
            if w.sample:
                last.append(len(ids) - 1)
        dev = self.device
        new_slots = torch.tensor(slots, dtype=torch.long, device=dev)
        if self.use_varlen:
            cu_q = [*q_start, len(ids)]
            cu_k = [0, *itertools.accumulate(len(c) for c in contexts)]
            batch = attention.VarlenBatch(
                torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev),
                max(len(w.tokens) for w in works), max(len(c) for c in contexts), torch.cat(contexts).to(dev))
            return self._run(attention.StepContext(self.k_pool, self.v_pool, new_slots, [], None, batch), ids, pos,
                             last)
        spans, single_q, single_ctx = [], [], []
        for w, start, c in zip(works, q_start, contexts):
            if len(w.tokens) == 1:
                single_q.append(start)
                single_ctx.append(c)
            else:
                spans.append(attention.SeqSpan(start, start + len(w.tokens), c.to(dev)))
        decode = None
        if single_q:
            width = max(len(c) for c in single_ctx)
            ctx_slots = torch.zeros(len(single_ctx), width, dtype=torch.long)
            valid = torch.zeros(len(single_ctx), width, dtype=torch.bool)
            for i, c in enumerate(single_ctx):
                ctx_slots[i, : len(c)] = c
                valid[i, : len(c)] = True
            decode = attention.DecodeBatch(torch.tensor(single_q, device=dev), ctx_slots.to(dev), valid.to(dev))
        return self._run(attention.StepContext(self.k_pool, self.v_pool, new_slots, spans, decode), ids, pos, last)

    def _run(self, ctx, ids: list[int], pos: list[int], last: list[int]) -> torch.Tensor:
        dev = self.device
        with attention.use_step(ctx):
            hidden = self.decoder(input_ids=torch.tensor([ids], device=dev),
                                  position_ids=torch.tensor([pos], device=dev), use_cache=False).last_hidden_state
        if not last:
            return hidden.new_empty(0, self.head.weight.shape[0])
        return self.head(hidden[0, torch.tensor(last, device=dev)]).float()

    def _context_slots(self, w: Work, block_size: int) -> torch.Tensor:
        parts = []
        offsets = torch.arange(block_size)
        for seg, length in w.context:
            blocks = torch.tensor(seg.blocks[: -(-length // block_size)], dtype=torch.long)
            parts.append((blocks[:, None] * block_size + offsets).flatten()[:length])
        return torch.cat(parts)
