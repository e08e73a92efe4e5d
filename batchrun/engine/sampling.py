"""Choosing the next token on the device: greedy, or temperature / top-k / top-p with one generator per row.

Each row of a batch has its own settings (a request's own, or the engine's). A row's generator is seeded from
(job seed, row id) and advanced once per token it draws, so what a row samples never depends on which rows
share its batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from batchrun.engine.constraints import pack
from batchrun.engine.requests import Completion, SamplingParams


def sampling_probs(logits: torch.Tensor, s: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (each row keeps at least its best token)."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def constrain(logits: torch.Tensor, allowed: list[Sequence[int] | np.ndarray | None]) -> torch.Tensor:
    """Logits [n, vocab] with every token outside row i's ``allowed[i]`` set to -inf (None: no restriction).
    ``allowed[i]`` is a collection of token ids, or a boolean mask over the vocabulary (a grammar's; tokens
    past its end are not allowed)."""
    words = (logits.shape[-1] + 31) // 32
    packed = torch.full((len(allowed), words), -1, dtype=torch.int32)
    for i, a in enumerate(allowed):
        if a is not None:
            packed[i] = torch.from_numpy(pack(a, words))
    return apply_mask_bits(logits, packed)


def apply_mask_bits(logits: torch.Tensor, packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, vocab] with the tokens that row i's packed mask ``packed[i]`` ([n, ceil(vocab / 32)] int32
    on the host, ``constraints.pack``'s layout) does not allow set to -inf; with ``rows`` ([n] int64 on the
    host), row i's mask is ``packed[rows[i]]`` instead (rows sharing a mask). The masks go to the device packed
    (32 tokens a word, in one copy: from page-locked memory it waits for nothing) and are unpacked there."""
    vocab = logits.shape[-1]
    words = packed.to(logits.device, non_blocking=True)
    if rows is not None:
        words = words.index_select(0, rows.to(logits.device, non_blocking=True))
    banned = ((words.unsqueeze(-1) & _bits(logits.device)) == 0).view(len(words), -1)[:, :vocab]
    return logits.masked_fill(banned, float("-inf"))


_BITS: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    """[32] int32: bit j set in entry j (made once per device: a step's masks then take three launches)."""
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32,
                                            device=device)
    return bits


def sample_tensor(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` [n, vocab], on its device (nothing waits for it): row i's argmax if
    ``params[i]`` is greedy, else drawn with ``generators[i]`` after ``params[i]``'s temperature, top-k and
    top-p. Rows with equal settings are filtered together; each row's draw depends only on its own logits,
    settings and generator."""
    tokens = logits.argmax(-1)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, s in enumerate(params):
        if not s.greedy:
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
    for rows in groups.values():
        probs = sampling_probs(logits[rows].float(), params[rows[0]])
        drawn = [torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(rows)]
        tokens[torch.tensor(rows, device=tokens.device)] = torch.cat(drawn)
    return tokens


def logprobs_of(logits: torch.Tensor, tokens: Sequence[int], k: int) -> tuple[list[float], list[list]]:
    """Each row's log-probability of its chosen token under ``logits`` [n, vocab] (the model's, before any
    temperature or constraint), and its ``k`` most likely tokens as (id, logprob), best first."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    if not k:
        return chosen, [[] for _ in chosen]
    top = lp.topk(min(k, lp.shape[-1]), -1)
    return chosen, [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]


class LogprobLog:
    """The log-probabilities of each request's tokens as they are chosen; ``attach`` puts them on its
    Completion (cut to its tokens: EOS and what follows a stop string are dropped)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._rows: dict[Hashable, tuple[list[float], list[list]]] = {}

    def add(self, key: Hashable, chosen: float, top: list) -> None:
        row = self._rows.setdefault(key, ([], []))
        row[0].append(chosen)
        row[1].append(top)

    def attach(self, c: Completion, key: Hashable) -> Completion:
        """``c`` with the log-probabilities logged under ``key``."""
        chosen, tops = self._rows.pop(key, ([], []))
        n = len(c.token_ids)
        decode = self.tokenizer.decode
        return replace(c, logprobs=chosen[:n], token_texts=[decode([int(t)]) for t in c.token_ids],
                       top_logprobs=[[(int(i), decode([int(i)]), float(v)) for i, v in top] for top in tops[:n]])


def row_generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
