"""GPU microbenchmark: the attention of one engine step, three ways (bf16, H200).

    python benchmarks/attention_bench.py --out results.jsonl

A step packs S sequences; sequence i has q_i new tokens attending causally (aligned to the end) to a context
of k_i tokens (its shared prefix + its own). Compared: ``varlen`` (torch's flash varlen_attn, what the engine
uses), ``flex`` (FlexAttention, compiled, with a block mask for "same sequence and causal"), and ``sdpa_loop``
(one SDPA call per sequence, the plain-torch path). Time excludes compilation and mask building.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.attention.varlen import varlen_attn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import record


def timeit(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def run_case(name: str, q_lens: list[int], k_extra: int, flex) -> dict:
    dev, dt, heads, kv_heads, dim = "cuda", torch.bfloat16, 32, 8, 64
    k_lens = [q + k_extra for q in q_lens]
    cq = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
    q = torch.randn(int(cq[-1]), heads, dim, device=dev, dtype=dt)
    k = torch.randn(int(ck[-1]), kv_heads, dim, device=dev, dtype=dt)
    v = torch.randn_like(k)
    seq_q = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), torch.tensor(q_lens, device=dev))
    seq_k = torch.repeat_interleave(torch.arange(len(k_lens), device=dev), torch.tensor(k_lens, device=dev))
    # each query's position in its context (contexts end with the new tokens), and each key's
    q_pos = torch.arange(int(cq[-1]), device=dev) - cq[seq_q] + (ck[seq_q + 1] - ck[seq_q]) \
        - (cq[seq_q + 1] - cq[seq_q])
    k_pos = torch.arange(int(ck[-1]), device=dev) - ck[seq_k]

    def mask_mod(b, h, qi, ki):
        return (seq_q[qi] == seq_k[ki]) & (k_pos[ki] <= q_pos[qi])

    block = create_block_mask(mask_mod, None, None, int(cq[-1]), int(ck[-1]), device=dev)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    t_var = timeit(lambda: varlen_attn(q, k, v, cq, ck, max(q_lens), max(k_lens), window_size=(-1, 0)))
    t_flex = timeit(lambda: flex(qh, kh, vh, block_mask=block, enable_gqa=True))

    def loop():
        for i in range(len(q_lens)):
            qi = q[cq[i] : cq[i + 1]].transpose(0, 1)[None]
            ki = k[ck[i] : ck[i + 1]].transpose(0, 1)[None]
            vi = v[ck[i] : ck[i + 1]].transpose(0, 1)[None]
            t, n = qi.shape[2], ki.shape[2]
            m = torch.ones(t, n, dtype=torch.bool, device=dev).tril(n - t)
            F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m, enable_gqa=True)

    t_loop = timeit(loop, reps=5)
    o1 = varlen_attn(q, k, v, cq, ck, max(q_lens), max(k_lens), window_size=(-1, 0))
    o2 = flex(qh, kh, vh, block_mask=block, enable_gqa=True)[0].transpose(0, 1)
    return {"bench": "attention", "case": name, "sequences": len(q_lens), "q_tokens": int(cq[-1]),
            "k_tokens": int(ck[-1]), "varlen_ms": round(t_var * 1e3, 3), "flex_ms": round(t_flex * 1e3, 3),
            "sdpa_loop_ms": round(t_loop * 1e3, 3), "max_abs_diff_varlen_flex": float((o1 - o2).abs().max()),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    flex = torch.compile(flex_attention)
    for name, q_lens, k_extra in (("prefill", [300] * 24, 1500), ("mixed", [300] * 8 + [1] * 256, 1500),
                                  ("decode", [1] * 512, 1500)):
        record(run_case(name, q_lens, k_extra, flex), args.out)


if __name__ == "__main__":
    main()
