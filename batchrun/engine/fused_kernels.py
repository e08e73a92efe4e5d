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


@triton.jit
def _rotate(X, OUT, C, S, x_off, out_off, c_off, H, stride_xh, stride_xd, stride_oh, stride_od, stride_cd, HALF,
            BLOCK_H: tl.constexpr, BLOCK: tl.constexpr):
    """All ``H`` heads of one token: ``x * cos + rotate_half(x) * sin``, each product and the sum rounded to
    the dtype (transformers' operators); the token's cos and sin read once for every head."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK)[None, :]
    ok = (h < H) & (d < HALF)
    c1 = tl.load(C + c_off + d * stride_cd, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_off + (d + HALF) * stride_cd, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(S + c_off + d * stride_cd, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(S + c_off + (d + HALF) * stride_cd, mask=d < HALF, other=0.0).to(tl.float32)
    x1 = tl.load(X + x_off + h * stride_xh + d * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + h * stride_xh + (d + HALF) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    ty = OUT.dtype.element_ty
    y1 = (x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)
    y2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    tl.store(OUT + out_off + h * stride_oh + d * stride_od, y1.to(ty), mask=ok)
    tl.store(OUT + out_off + h * stride_oh + (d + HALF) * stride_od, y2.to(ty), mask=ok)


@triton.jit
def rotary_kernel(Q, K, QO, KO, C, S, T, HQ, HK,
                  sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                  sqo_b, sqo_h, sqo_t, sqo_d, sko_b, sko_h, sko_t, sko_d,
                  sc_b, sc_t, sc_d, HALF, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token, 0 or 1): the rotary embedding of every query head (0) or every key head (1) of one
    token of ``Q`` [B, HQ, T, D] and ``K`` [B, HK, T, D] (any strides), with ``C``/``S`` [B, T, D] (cos,
    sin)."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    c_off = b * sc_b + t * sc_t
    if tl.program_id(1) == 0:
        _rotate(Q, QO, C, S, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, c_off, HQ, sq_h, sq_d, sqo_h, sqo_d,
                sc_d, HALF, BLOCK_HQ, BLOCK)
    else:
        _rotate(K, KO, C, S, b * sk_b + t * sk_t, b * sko_b + t * sko_t, c_off, HK, sk_h, sk_d, sko_h, sko_d,
                sc_d, HALF, BLOCK_HK, BLOCK)
