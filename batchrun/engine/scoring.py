"""Scoring given continuations of a prompt: log p(continuation | prompt) under the model, by plain forward
passes. For ``choices`` constraints: every choice's probability, not only the chosen one's (``choice_probs``).

Exact and simple (each prompt + continuation is one padded row; no KV reuse), so it costs a prefill of the
prompt per choice: fine for classification jobs with a few short choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchrun.engine.loader import LoadedModel


@torch.inference_mode()
def sequence_logprobs(loaded: LoadedModel, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                      batch_size: int = 16) -> list[float]:
    """log p(continuation | prompt) of each continuation (the sum of its tokens' log-probabilities)."""
    out: list[float] = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start : start + batch_size]
        rows = [list(prompt) + list(c) for c in chunk]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: positions are the same as without it
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
        lp = torch.log_softmax(logits.float(), -1)
        for i, c in enumerate(chunk):
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=lp.device)
            out.append(float(lp[i, pos, torch.tensor(list(c), device=lp.device)].sum()))
    return out


def choice_probs(loaded: LoadedModel, prompt: Sequence[int], choices: Sequence[str], end: Sequence[int] = ()
                 ) -> dict[str, float]:
    """Each choice's probability after ``prompt``, renormalized over the choices: the full sequence — its
    tokens, then ``end`` (EOS), so that a choice that is the beginning of another is told apart."""
    tok = loaded.tokenizer
    seqs = [tok(c, add_special_tokens=False)["input_ids"] + list(end) for c in choices]
    lps = torch.tensor(sequence_logprobs(loaded, prompt, seqs), dtype=torch.float64)
    return dict(zip(choices, torch.softmax(lps, 0).tolist()))
