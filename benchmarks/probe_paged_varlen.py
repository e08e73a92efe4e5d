"""Probe (H200): does torch's varlen_attn take a paged KV pool (block_table + seqused_k) with small pages, and
return the log-sum-exp? Compares against plain SDPA on gathered keys. Prints one JSON line per case."""

from __future__ import annotations

import inspect
import json
import time

import torch
from torch.nn.attention import varlen

print(torch.__version__, inspect.signature(varlen.varlen_attn), flush=True)


def case(page: int, causal: bool, lse: bool, gqa: bool = True) -> dict:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    h, kvh, d = 32, 8, 64
    pages = 4096
    pool_k = torch.randn(pages, page, kvh, d, device=dev, dtype=dt)
    pool_v = torch.randn(pages, page, kvh, d, device=dev, dtype=dt)
    lens_k = [37, 300, 5, 129]
    lens_q = [1, 20, 5, 1] if causal else [3, 7, 2, 9]
    n_pages = [-(-k // page) for k in lens_k]
    perm = torch.randperm(pages, device=dev)
    table = torch.zeros(len(lens_k), max(n_pages), dtype=torch.int32, device=dev)
    used = 0
    for i, n in enumerate(n_pages):
        table[i, :n] = perm[used : used + n].int()
        used += n
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=dt)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    seqused = torch.tensor(lens_k, dtype=torch.int32, device=dev)
    out = {"page": page, "causal": causal, "lse": lse}
    try:
        kw = dict(window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True, seqused_k=seqused,
                  block_table=table)
        if lse:
            kw["return_aux"] = varlen.AuxRequest(lse=True)
        res = varlen.varlen_attn(q, pool_k, pool_v, cu_q, None, max(lens_q), max(lens_k), **kw)
        o = res[0] if isinstance(res, tuple) else res
        err = 0.0
        for i in range(len(lens_k)):
            blocks = table[i, : n_pages[i]].long()
            k = pool_k[blocks].reshape(-1, kvh, d)[: lens_k[i]].transpose(0, 1).repeat_interleave(h // kvh, 0)
            v = pool_v[blocks].reshape(-1, kvh, d)[: lens_k[i]].transpose(0, 1).repeat_interleave(h // kvh, 0)
            qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
            t, n = lens_q[i], lens_k[i]
            mask = torch.ones(t, n, dtype=torch.bool, device=dev).tril(n - t) if causal else None
            ref = torch.nn.functional.scaled_dot_product_attention(qi.float(), k.float(), v.float(), attn_mask=mask)
            err = max(err, (ref.transpose(0, 1) - o[cu_q[i] : cu_q[i + 1]].float()).abs().max().item())
        out["max_err"] = err
        if lse:
            out["lse_shape"] = list(res[1].shape)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            varlen.varlen_attn(q, pool_k, pool_v, cu_q, None, max(lens_q), max(lens_k), **kw)
        torch.cuda.synchronize()
        out["ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


for page in (16, 64, 256):
    for causal in (False, True):
        print(json.dumps(case(page, causal, lse=True)), flush=True)
print(json.dumps(case(16, True, lse=False)), flush=True)
