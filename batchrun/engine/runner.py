"""The runner: turns a step (``engine.step.Step``) into one packed forward pass and returns the logits to
sample from. Computes, never decides (the scheduler decides).

All sequences of a step go in one row: token ids concatenated, position ids restarting per sequence, no
padding. The model's attention layers run the chosen attention backend (``engine.attention``) over the
paged KV pool.
"""

from __future__ import annotations

import torch

from batchrun.engine import attention
from batchrun.engine.loader import LoadedModel
from batchrun.engine.step import Step
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


class Runner:
    """Owns the KV pool tensors and the attention backend; ``forward(step)`` runs one step."""

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
        k_pool = torch.empty(shape, dtype=dtype, device=loaded.device)  # only written slots are read
        v_pool = torch.empty(shape, dtype=dtype, device=loaded.device)
        self.backend = attention.choose_backend(loaded.device, dtype)(k_pool, v_pool)
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = loaded.device

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """Run the step; return logits [len(step.sample_index), vocab], in the order of ``step.sample_keys``."""
        t = step.num_tokens
        # One host-to-device copy for the packed row's ids and positions and the sampled positions.
        ints = torch.tensor(step.token_ids + step.positions + step.sample_index, dtype=torch.long)
        ints = ints.to(self.device, non_blocking=True)
        ids, pos, last = ints[:t], ints[t : 2 * t], ints[2 * t :]
        self.backend.prepare(step)
        with attention.use_backend(self.backend):
            hidden = self.decoder(input_ids=ids[None], position_ids=pos[None], use_cache=False).last_hidden_state
        if not step.sample_index:
            return hidden.new_empty(0, self.head.weight.shape[0])
        return self.head(hidden[0, last]).float()
