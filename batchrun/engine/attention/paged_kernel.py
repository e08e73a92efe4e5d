"""A Triton kernel: attention of packed queries over a paged KV pool, read in place, returning log-sum-exp.

The work is a list of *items*. An item is a run of query rows (each row names a token of the step, so the
rows of many sequences can be stacked) and one KV level: a block table (pool blocks) and a key count. An item
is either causal (one sequence's own level: its rows are its last tokens, in order, and row r sees keys
``0 .. klen - nrows + r``) or not (a shared prefix level: every row sees every key). Each program takes
``BLOCK_M`` rows of one item for one KV head — the ``G`` query heads of that KV head stacked, so a row tile is
``BLOCK_M * GP`` rows of a matrix product (``GP``: ``G`` rounded up to a power of two, as Triton's shapes must
be; so is the head size ``D``, to ``DP``: SmolLM2's 9 query heads over 3 KV heads give G = 3) — and streams
the level's keys in tiles of ``BLOCK_N``, gathering them through the block table straight from the pool (no
copy of any context). It writes each row's partial output and log-sum-exp; rows with several items (a shared
prefix, then their own tokens) are merged by log-sum-exp afterwards, exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale, stride_kt, stride_kh,
              D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr,
              MASKED: tl.constexpr):
    """One tile of ``BLOCK_N`` keys from ``n0``, gathered through the block table; online softmax update in
    base 2 (``scale`` includes log2(e); ``m_i`` is in base 2). An unmasked tile (``MASKED`` false) holds only
    keys that every row of the tile sees: no bounds, no causal mask."""
    d = tl.arange(0, DP)
    kidx = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        k_ok = kidx < kend
        block = tl.load(TABLE + table0 + kidx // PAGE, mask=k_ok, other=0)
        kd_ok = k_ok[:, None]
        if DP != D:  # (compile time: only a padded head size pays for the mask)
            kd_ok = kd_ok & (d < D)[None, :]
    else:
        block = tl.load(TABLE + table0 + kidx // PAGE)
        kd_ok = (d < D)[None, :]
    slot = block.to(tl.int64) * PAGE + kidx % PAGE
    if MASKED or DP != D:
        k = tl.load(K + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kd_ok, other=0.0)
        v = tl.load(V + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kd_ok, other=0.0)
    else:
        k = tl.load(K + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :])
        v = tl.load(V + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :])
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    if MASKED:
        visible = k_ok[None, :] & (kidx[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def paged_attention_kernel(
    Q, K, V, OUT, LSE,  # Q [T, H, D] (any strides); K, V [slots, KVH, D]; OUT [P, H, D] fp32; LSE [P, H] fp32
    ROWS,  # int32 [P]: the query token (row of Q) of each part row
    ITEM_ROW0, ITEM_NROWS, ITEM_TABLE0, ITEM_KLEN, ITEM_CAUSAL,  # int32 [I]
    TABLE,  # int32: every item's block ids, concatenated
    TILE_ITEM, TILE_ROW,  # int32 [tiles]: the item of each program and its first row within the item
    scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_lp,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products (the oracle tests), not TF32
    INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    item = tl.load(TILE_ITEM + tile)
    r0 = tl.load(TILE_ROW + tile)
    row0 = tl.load(ITEM_ROW0 + item)
    nrows = tl.load(ITEM_NROWS + item)
    table0 = tl.load(ITEM_TABLE0 + item)
    klen = tl.load(ITEM_KLEN + item)
    causal = tl.load(ITEM_CAUSAL + item)

    offs = tl.arange(0, BLOCK_M * GP)
    r = r0 + offs // GP  # row within the item
    g = offs % GP
    head = kv_head * G + g
    row_ok = r < nrows
    if GP != G:  # (compile time, as below: a power-of-two model's kernel is the unpadded one)
        row_ok = row_ok & (g < G)
    part = row0 + r
    token = tl.load(ROWS + part, mask=row_ok, other=0)
    d = tl.arange(0, DP)
    out_ok = row_ok[:, None]
    if DP != D:
        out_ok = out_ok & (d < D)[None, :]
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=out_ok, other=0.0)
    # The last key each row sees; a causal tile needs keys only up to its last row's limit.
    last = tl.where(causal != 0, klen - nrows + r, klen - 1)
    excess = nrows - r0 - BLOCK_M  # rows of the item after this tile (if positive)
    kend = klen - causal * (excess + tl.abs(excess)) // 2

    # Keys every row of the tile sees come first, in whole tiles without masks; the rest (the last keys of a
    # level, the diagonal of a causal one) in masked tiles.
    full = tl.where(causal != 0, klen - nrows + r0 + 1, klen)
    full = tl.minimum(full, kend) // BLOCK_N * BLOCK_N
    scale2 = scale * 1.4426950408889634  # (log2(e): exp(x) = exp2(x * log2(e)))
    m_i = tl.full([BLOCK_M * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GP], tl.float32)
    acc = tl.zeros([BLOCK_M * GP, DP], tl.float32)
    if INTERPRET:  # Triton's interpreter (the CPU tests) needs while loops for bounds loaded from memory
        n0 = 0
        while n0 < full:
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale2,
                                      stride_kt, stride_kh, D, DP, BLOCK_N, PAGE, IEEE, False)
            n0 += BLOCK_N
        while n0 < kend:
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale2,
                                      stride_kt, stride_kh, D, DP, BLOCK_N, PAGE, IEEE, True)
            n0 += BLOCK_N
    else:
        for n0 in tl.range(0, full, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale2,
                                      stride_kt, stride_kh, D, DP, BLOCK_N, PAGE, IEEE, False)
        for n0 in tl.range(full, kend, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale2,
                                      stride_kt, stride_kh, D, DP, BLOCK_N, PAGE, IEEE, True)
    out = acc / l_i[:, None]
    tl.store(OUT + part[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], out, mask=out_ok)
    tl.store(LSE + part * stride_lp + head, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)  # (ln 2)


@triton.jit
def store_kv_kernel(KEY, VALUE, K, V, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh, stride_pt, stride_ph,
                    KVH: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """Write one new token's K and V (every KV head) to its pool slot: KEY, VALUE [T, KVH, D] (any strides)."""
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, DP)
    ok = (h < KVH)[:, None]
    if DP != D:
        ok = ok & (d < D)[None, :]
    slot = tl.load(SLOTS + t).to(tl.int64)
    k = tl.load(KEY + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
    v = tl.load(VALUE + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
    dst = slot * stride_pt + h[:, None] * stride_ph + d[None, :]
    tl.store(K + dst, k.to(K.dtype.element_ty), mask=ok)
    tl.store(V + dst, v.to(V.dtype.element_ty), mask=ok)


@triton.jit
def merge_kernel(OUT, LSE, PARTS, FINAL, stride_ot, stride_oh, stride_lp, stride_ft, stride_fh,
                 H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, L: tl.constexpr):
    """One token's attention output from its parts, exactly: its own part (part row = the token) and up to
    ``L`` shared-prefix parts (PARTS [T, L], -1 where none), weighted by exp(lse - max lse); cast to FINAL's
    dtype. With ``L == 0`` it only casts."""
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, DP)
    hm = h < H
    hd = hm[:, None]
    if DP != D:
        hd = hd & (d < D)[None, :]
    own = tl.load(LSE + t * stride_lp + h, mask=hm, other=0.0)
    top = own
    for j in tl.static_range(L):
        p = tl.load(PARTS + t * L + j)
        lse = tl.load(LSE + tl.maximum(p, 0) * stride_lp + h, mask=hm & (p >= 0), other=float("-inf"))
        top = tl.maximum(top, lse)
    w = tl.exp(own - top)
    den = w
    acc = tl.load(OUT + t * stride_ot + h[:, None] * stride_oh + d[None, :], mask=hd, other=0.0)
    acc = acc * w[:, None]
    for j in tl.static_range(L):
        p = tl.load(PARTS + t * L + j)
        ok = hm & (p >= 0)
        q = tl.maximum(p, 0)
        lse = tl.load(LSE + q * stride_lp + h, mask=ok, other=float("-inf"))
        wj = tl.where(ok, tl.exp(lse - top), 0.0)
        den += wj
        part = tl.load(OUT + q * stride_ot + h[:, None] * stride_oh + d[None, :], mask=ok[:, None] & hd, other=0.0)
        acc += part * wj[:, None]
    out = acc / den[:, None]
    tl.store(FINAL + t * stride_ft + h[:, None] * stride_fh + d[None, :], out.to(FINAL.dtype.element_ty),
             mask=hd)
