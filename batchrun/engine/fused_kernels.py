"""Triton kernels of ``engine.fused``: RMSNorm over a row, and ``silu(gate) * up`` over a block of a row.

Each rounds where transformers' operators round (the normalized row to the input's dtype before the weight's
product; ``silu`` to its dtype before the product with ``up``), and computes in float32 between.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    """One program per row of ``X`` [rows, N]: ``Y = W * (X / sqrt(mean(X^2) + eps))`` (``BLOCK`` >= N)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    h = (x * tl.math.rsqrt(var + eps)).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def silu_mul_kernel(GU, OUT, stride_gu, stride_out, HALF, BLOCK: tl.constexpr):
    """Program (row, block): ``OUT[row, cols] = silu(GU[row, cols]) * GU[row, HALF + cols]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HALF
    g = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + HALF + cols, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty)
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(OUT + row * stride_out + cols, y.to(OUT.dtype.element_ty), mask=ok)
