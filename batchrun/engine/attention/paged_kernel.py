"""A Triton kernel: attention of packed queries over a paged KV pool, read in place, returning log-sum-exp.

The work is a list of *items*. An item is a run of query rows (each row names a token of the step, so the
rows of many sequences can be stacked) and one KV level: a block table (pool blocks) and a key count. An item
is either causal (one sequence's own level: its rows are its last tokens, in order, and row r sees keys
``0 .. klen - nrows + r``) or not (a shared prefix level: every row sees every key). Each program takes
``BLOCK_M`` rows of one item for one KV head — the ``G`` query heads of that KV head stacked, so a row tile is
``BLOCK_M * G`` rows of a matrix product — and streams the level's keys in tiles of ``BLOCK_N``, gathering
them through the block table straight from the pool (no copy of any context). It writes each row's partial
output and log-sum-exp; rows with several items (a shared prefix, then their own tokens) are merged by
log-sum-exp afterwards, exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale, stride_kt, stride_kh,
              D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """One tile of ``BLOCK_N`` keys from ``n0``, gathered through the block table; online softmax update."""
    d = tl.arange(0, D)
    kidx = n0 + tl.arange(0, BLOCK_N)
    k_ok = kidx < kend
    block = tl.load(TABLE + table0 + kidx // PAGE, mask=k_ok, other=0)
    slot = block.to(tl.int64) * PAGE + kidx % PAGE
    k = tl.load(K + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(V + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=k_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    visible = k_ok[None, :] & (kidx[None, :] <= last[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
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
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
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

    offs = tl.arange(0, BLOCK_M * G)
    r = r0 + offs // G  # row within the item
    head = kv_head * G + offs % G
    row_ok = r < nrows
    part = row0 + r
    token = tl.load(ROWS + part, mask=row_ok, other=0)
    d = tl.arange(0, D)
    q = tl.load(Q + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None],
                other=0.0)
    # The last key each row sees; a causal tile needs keys only up to its last row's limit.
    last = tl.where(causal != 0, klen - nrows + r, klen - 1)
    excess = nrows - r0 - BLOCK_M  # rows of the item after this tile (if positive)
    kend = klen - causal * (excess + tl.abs(excess)) // 2

    m_i = tl.full([BLOCK_M * G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * G], tl.float32)
    acc = tl.zeros([BLOCK_M * G, D], tl.float32)
    if INTERPRET:  # Triton's interpreter (the CPU tests) needs a while loop for a bound loaded from memory
        n0 = 0
        while n0 < kend:
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale,
                                      stride_kt, stride_kh, D, BLOCK_N, PAGE, IEEE)
            n0 += BLOCK_N
    else:
        for n0 in tl.range(0, kend, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, K, V, TABLE, table0, n0, kend, last, kv_head, m_i, l_i, acc, scale,
                                      stride_kt, stride_kh, D, BLOCK_N, PAGE, IEEE)
    out = acc / l_i[:, None]
    tl.store(OUT + part[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :], out, mask=row_ok[:, None])
    tl.store(LSE + part * stride_lp + head, m_i + tl.log(l_i), mask=row_ok)
