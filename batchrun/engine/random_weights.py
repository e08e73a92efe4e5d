"""Random-weight models (``model.load: random``): built from a config, no weights file read.

For benchmarks and smoke tests: the outputs are meaningless. The built-in sizes are Llama-style
architectures (../shared/BENCHMARKS.md) whose vocabulary is the tokenizer's. Every parameter is drawn from
N(0, 0.02) by a generator seeded with ``model.seed`` on the target device, straight in the target dtype: the
same seed, device and dtype give the same weights.
"""

from __future__ import annotations

from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336),
}
STD = 0.02


def size_config(size: str, tokenizer: Any) -> Any:
    """The ``transformers.LlamaConfig`` of a built-in size, with the tokenizer's vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], vocab_size=len(tokenizer), max_position_embeddings=8192,
                       tie_word_embeddings=False, initializer_range=STD, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build(config: Any, device: str, dtype: Any, seed: int, trust_remote_code: bool = False) -> Any:
    """The model of ``config`` on ``device`` in ``dtype`` (a torch dtype), every parameter drawn from
    N(0, 0.02) with a generator seeded with ``seed`` on ``device`` (no CPU round-trip for a GPU build)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device), _no_init():  # (transformers' own init would be drawn over anyway: skip it)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, STD, generator=generator)
    return model.eval()


def _no_init() -> Any:
    """transformers' context that skips its weight initialization (a no-op where it has none)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()
