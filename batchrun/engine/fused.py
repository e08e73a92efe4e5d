"""Fused GPU kernels for the model's own layers: RMSNorm in one kernel, the SwiGLU MLP's gate and up
projections in one matrix product followed by one kernel for ``silu(gate) * up``, and the rotary embedding of
a layer's queries and keys in one kernel.

transformers' Llama-family layers compute these with plain torch operators: an RMSNorm is six elementwise
kernels over the hidden states with float32 intermediates (cast, square, mean, rsqrt, multiply, cast and
multiply by the weight), the MLP is two projections, ``silu`` and a product, and the rotary embedding is
about six operators each for the queries and the keys (products, ``rotate_half``'s slices, negation and
concatenation, the sum). On the H200 those elementwise kernels and copies were about 20% of 1b fewshot's GPU
time, and each is a launch in a step that is not replayed from a CUDA graph. ``install(model)`` gives the
supported modules a fused forward (Triton), used only while a batchrun engine runs on a GPU (``active``):
the reference engine and every CPU run keep transformers' own code, which stays the oracle.

The rotary kernel rounds where transformers' operators round and gives exactly its values. The fused RMSNorm
computes as transformers does (float32 sum of squares, ``rsqrt``, cast to the input's dtype, then the
weight's product rounded to it), but its reduction runs in another order, so a value can differ from
transformers' by a unit in the last place (two in float16 on a GPU, whose ``rsqrt`` is approximate); so can
``silu`` (``exp``). batchrun's tokens are then compared with the reference engine's tie-aware, as for
attention (the GPU tests, which run with the kernels on the GPU). The kernels are launched without
floating-point contraction (``enable_fp_fusion=False``): a fused multiply-add would round once where
transformers' operators round twice. The MLP's one projection reads the gate's and the up projection's
weights from one tensor (the two modules' weights become views of it: no extra memory). On by default;
``BATCHRUN_FUSED=0`` leaves the model's modules as they are. On the H200
(``benchmarks/results/suite-h200.jsonl``, 2026-12-01, seed 4) they took 1b fewshot (0.25) from 1.91 s to
1.41-1.42 s, each the first run of its process, and from 511 to 212 launches a step; run second in the process
after the unfused engine, 1.28 s, and 27-31% off the other 1b workloads' times (the first run of a process
is the slower one: see the README).
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from batchrun.engine.attention.paged import available as triton_available

ROTARY_MODULES = ("llama", "mistral", "qwen2", "qwen3")  # transformers.models.X.modeling_X.apply_rotary_pos_emb
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # weight * x / rms(x), x's dtype
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down(act(gate(x)) * up(x))
_STATE = threading.local()  # (``active``, ``on``: 0 not in this thread, 1 on a GPU, 2 anywhere)


def wanted() -> bool:
    """Are fused kernels wanted (``BATCHRUN_FUSED``: 1, the default, or 0)?"""
    raw = os.environ.get("BATCHRUN_FUSED", "1")
    if raw not in ("0", "1"):
        from batchrun.errors import RuntimeFailure

        raise RuntimeFailure(f"BATCHRUN_FUSED={raw!r}: expected 1 (fused RMSNorm, SwiGLU and rotary kernels on "
                             "a GPU) or 0 (transformers' own layers)")
    return raw == "1"


@contextmanager
def active(anywhere: bool = False) -> Iterator[None]:
    """The block's forward passes in this thread use the fused forward of the modules ``install`` changed, on
    a GPU (``anywhere``: on the CPU too, in Triton's interpreter: the tests)."""
    before = getattr(_STATE, "on", 0)
    _STATE.on = 2 if anywhere else 1
    try:
        yield
    finally:
        _STATE.on = before


def install(model: Any) -> int:
    """Give ``model``'s supported RMSNorm and SwiGLU MLP modules a fused forward, and its family's rotary
    embedding a fused one (used inside ``active``); the number of modules and families changed (0 if fused
    kernels are not wanted or Triton is missing). Idempotent."""
    if not wanted() or not triton_available():
        return 0
    changed = sum(_patch_rotary(where) for where in {type(m).__module__ for m in model.modules()})
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, "_batchrun_fused", False):
            changed += 1
        elif name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            _wrap(module, _rms_norm_forward)
            changed += 1
        elif name in SWIGLU_MLPS and _is_swiglu(module):
            _join_gate_up(module)
            _wrap(module, _swiglu_forward)
            changed += 1
    return changed


def _patch_rotary(where: str) -> int:
    """The rotary embedding of a supported model family's module (``transformers.models.llama.modeling_llama``,
    ...), fused (inside ``active``): 1 if it is (patched now or before), else 0."""
    family = where.rsplit(".", 2)
    if len(family) < 3 or family[-2] not in ROTARY_MODULES or family[-1] != f"modeling_{family[-2]}":
        return 0
    module = sys.modules.get(where)
    plain = getattr(module, "apply_rotary_pos_emb", None)
    if plain is None:
        return 0
    if getattr(plain, "_batchrun_fused", False):
        return 1

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        on = getattr(_STATE, "on", 0)
        if (on and (on == 2 or q.is_cuda) and unsqueeze_dim == 1 and q.dim() == k.dim() == 4 and cos.dim() == 3
                and q.dtype == k.dtype == cos.dtype == sin.dtype and q.shape[-1] % 2 == 0
                and cos.shape == sin.shape and cos.shape[0] in (1, q.shape[0])
                and cos.shape[1:] == (q.shape[2], q.shape[3])):
            return rotary(q, k, cos, sin)
        return plain(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._batchrun_fused = True
    apply_rotary_pos_emb.__wrapped__ = plain
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return 1


def _wrap(module: Any, fused) -> None:
    plain = module.forward

    def forward(self, *args, **kwargs):
        on = getattr(_STATE, "on", 0)
        if on and args and not kwargs and (on == 2 or args[0].is_cuda):
            return fused(self, args[0])
        return plain(*args, **kwargs)

    module.forward = types.MethodType(forward, module)
    module._batchrun_fused = True


def _is_swiglu(mlp: Any) -> bool:
    act = getattr(mlp, "act_fn", None)
    ok = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return ok and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))


def _join_gate_up(mlp: Any) -> None:
    """The gate's and the up projection's weights (and biases) in one tensor, the two modules' parameters
    becoming views of its halves."""
    gate, up = mlp.gate_proj, mlp.up_proj
    with torch.inference_mode(False), torch.no_grad():  # (plain tensors, whatever mode the caller is in)
        joined = torch.cat([gate.weight, up.weight])
        n = gate.weight.shape[0]
        gate.weight = torch.nn.Parameter(joined[:n], requires_grad=False)
        up.weight = torch.nn.Parameter(joined[n:], requires_grad=False)
        mlp._batchrun_gate_up = joined
        mlp._batchrun_gate_up_bias = None
        if gate.bias is not None and up.bias is not None:
            bias = torch.cat([gate.bias, up.bias])
            gate.bias = torch.nn.Parameter(bias[:n], requires_grad=False)
            up.bias = torch.nn.Parameter(bias[n:], requires_grad=False)
            mlp._batchrun_gate_up_bias = bias


def _rms_norm_forward(norm: Any, x: torch.Tensor) -> torch.Tensor:
    w = norm.weight
    if w.dtype != x.dtype or x.shape[-1] != w.shape[0]:  # (transformers' type promotion: not fused)
        return type(norm).forward(norm, x)  # (transformers' own)
    return rms_norm(x, w, norm.variance_epsilon)


def _swiglu_forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    gate_up = F.linear(x, mlp._batchrun_gate_up, mlp._batchrun_gate_up_bias)
    return mlp.down_proj(silu_mul(gate_up))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dimension, in one kernel."""
    from batchrun.engine import fused_kernels as k

    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        k.rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, float(eps),
                                            BLOCK=_pow2(n), enable_fp_fusion=False)
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` holds the gate in the first half of its last dimension and up in
    the second, each rounded to its dtype as transformers' two operators round, in one kernel."""
    from batchrun.engine import fused_kernels as k

    two = gate_up.shape[-1]
    half = two // 2
    rows = gate_up.reshape(-1, two)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], half), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0]:
        block = min(_pow2(half), 1024)
        k.silu_mul_kernel[(rows.shape[0], -(-half // block))](rows, out, rows.stride(0), out.stride(0), half,
                                                              BLOCK=block, enable_fp_fusion=False)
    return out.view(*gate_up.shape[:-1], half)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' ``apply_rotary_pos_emb`` (``q`` [B, HQ, T, D], ``k`` [B, HK, T, D], ``cos`` and ``sin``
    [B or 1, T, D]) in one kernel for both; the outputs keep the inputs' memory layout."""
    from batchrun.engine import fused_kernels as kern

    qo, ko = torch.empty_like(q), torch.empty_like(k)
    b, hq, t, d = q.shape
    c_b, c_t, c_d = cos.stride()
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
        c_b, c_t, c_d = cos.stride()
    if cos.shape[0] == 1:  # (one batch row of cos and sin for every row of q and k)
        c_b = 0
    if b * t:
        kern.rotary_kernel[(b * t, 2)](q, k, qo, ko, cos, sin, t, hq, k.shape[1], *q.stride(), *k.stride(),
                                       *qo.stride(), *ko.stride(), c_b, c_t, c_d, d // 2, BLOCK_HQ=_pow2(hq),
                                       BLOCK_HK=_pow2(k.shape[1]), BLOCK=_pow2(d // 2), enable_fp_fusion=False)
    return qo, ko


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
