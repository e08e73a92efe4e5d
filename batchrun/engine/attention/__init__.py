"""batchrun's attention for transformers models: the hook transformers calls, and the choice of backend.

transformers' attention layers call the registered function ``"batchrun"`` with q, k, v after rotary
embedding. Inside a batchrun step (``use_backend``) the call goes to the step's attention backend
(``base.AttentionBackend``: ``torch_sdpa`` everywhere, ``varlen`` on CUDA in half precision, ``paged``: the
pool read in place and shared prefixes read once per step, in Triton); outside one
(e.g. the reference engine's ``generate`` on the same model) it is plain SDPA.
"""

from __future__ import annotations

import os
import threading

import torch

from batchrun.engine.attention.base import AttentionBackend
from batchrun.engine.attention.paged import PagedBackend
from batchrun.engine.attention.paged import available as paged_available
from batchrun.engine.attention.torch_sdpa import TorchBackend
from batchrun.engine.attention.varlen import VarlenBackend
from batchrun.engine.attention.varlen import available as varlen_available

__all__ = ["BACKENDS", "AttentionBackend", "choose_backend", "register", "use_backend"]

NAME = "batchrun"
BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (TorchBackend, VarlenBackend, PagedBackend)}
_LOCAL = threading.local()


def choose_backend(device: str, dtype: torch.dtype) -> type[AttentionBackend]:
    """The fastest backend that runs here. ``BATCHRUN_ATTENTION=<name>`` forces one (to compare them)."""
    forced = os.environ.get("BATCHRUN_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BATCHRUN_ATTENTION={forced!r}: choose one of {sorted(BACKENDS)}")
        return BACKENDS[forced]
    if not varlen_available(device, dtype):  # (CUDA and half precision)
        return TorchBackend
    # Measured on the H200 (benchmarks/results/gpu-paged.jsonl): paged is faster on every workload.
    return PagedBackend if paged_available() else VarlenBackend


class use_backend:
    """Context manager: the backend that computes the attention of the model's layers in this step."""

    def __init__(self, backend: AttentionBackend):
        self.backend = backend

    def __enter__(self) -> AttentionBackend:
        _LOCAL.backend = self.backend
        return self.backend

    def __exit__(self, *exc) -> None:
        _LOCAL.backend = None


def batchrun_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, T, D]; key, value [1, KVH, T, D]. Returns ([1, T, H, D], None)."""
    backend: AttentionBackend | None = getattr(_LOCAL, "backend", None)
    if backend is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return backend.forward(query, key, value, module.layer_idx, scaling), None


def _mask(*args, **kwargs):
    """No mask inside a batchrun step (the backend knows who sees what); SDPA's mask outside one."""
    if getattr(_LOCAL, "backend", None) is not None:
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
