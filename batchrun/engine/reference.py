"""The reference engine: plain transformers ``generate`` over left-padded batches of consecutive requests.

It stays for good as the correctness oracle and the benchmark baseline, so it is deliberately simple.
Per-row limits (max_tokens, stop strings) are stopping criteria and per-request logits constraints a logits
processor; each row samples under its own settings (the request's, or the engine's), and a row at temperature
> 0 draws its token from its own generator (seeded from the job seed and the row id), so a row's output does
not depend on which rows share its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Completion, Interrupted, Request, SamplingParams
from batchrun.engine.sampling import LogprobLog, constrain, logprobs_of, row_generator, sample_tensor
from batchrun.engine.stopping import Stopper
from batchrun.plan.plan import Plan


class ReferenceEngine:
    name = "reference"

    def __init__(self, loaded: LoadedModel, sampling: SamplingParams, batch_size: int = 16):
        self.loaded = loaded
        self.sampling = sampling
        self.batch_size = batch_size
        self.stats: dict = {}  # (no KV pool, no steps of its own)
        self.stopper = Stopper(loaded.tokenizer, sampling.stop, [] if sampling.ignore_eos else loaded.eos_ids)
        tok = loaded.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (loaded.eos_ids or [0])[0]

    def run(self, requests: Sequence[Request], plan: Plan | None = None,
            interrupt: Callable[[], bool] | None = None) -> Iterator[list[Completion]]:
        """Yield the completions of each batch as it finishes. Requests run in plan order (``plan`` was built
        over ``requests``), or in the order given without a plan."""
        if plan is not None:
            requests = [requests[k] for k in plan.order.tolist()]
        for start in range(0, len(requests), self.batch_size):
            try:
                done = self._generate(list(requests[start : start + self.batch_size]), interrupt)
            except Interrupted:
                return  # the batch in flight is dropped: it is recomputed on resume
            yield done

    @torch.inference_mode()
    def _generate(self, batch: list[Request], interrupt: Callable[[], bool] | None = None) -> list[Completion]:
        device = self.loaded.device
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        max_new = max(r.max_tokens for r in batch)
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, pad_token_id=self.pad_id,
            eos_token_id=None if self.sampling.ignore_eos else self.loaded.eos_ids,
        )
        params = [r.sampling or self.sampling for r in batch]
        processors = LogitsProcessorList()
        if any(r.constraint is not None for r in batch):
            processors.append(_RowConstraints(batch, width))
        if not all(p.greedy for p in params):
            processors.append(_RowSampler(params, [r.seed for r in batch], device))
        stops = StoppingCriteriaList([_RowStops(batch, width, self.stopper, [p.stop for p in params], interrupt)])
        k_top = self.sampling.logprobs
        out = self.loaded.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
            logits_processor=processors, stopping_criteria=stops,
            output_logits=k_top is not None, return_dict_in_generate=k_top is not None,
        )
        sequences = out if k_top is None else out.sequences
        generated = sequences[:, width:].tolist()
        done = [self.stopper.finish(r.key, g, r.max_tokens, p.stop) for r, g, p in zip(batch, generated, params)]
        if k_top is None:
            return done
        lps = LogprobLog(self.loaded.tokenizer)
        for j, logits in enumerate(out.logits):  # (the model's raw logits of each step)
            for row, (chosen, top) in enumerate(zip(*logprobs_of(logits, sequences[:, width + j].tolist(), k_top))):
                lps.add(row, chosen, top)
        return [lps.attach(c, row) for row, c in enumerate(done)]


class _RowStops(StoppingCriteria):
    """A row is done at its own max_tokens or once it produced one of its stop strings."""

    def __init__(self, batch: list[Request], prompt_width: int, stopper: Stopper, stops: list[tuple[str, ...]],
                 interrupt: Callable[[], bool] | None = None):
        self.limits = [r.max_tokens for r in batch]
        self.width = prompt_width
        self.stopper = stopper
        self.stops = stops
        self.interrupt = interrupt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.interrupt is not None and self.interrupt():
            raise Interrupted
        n = input_ids.shape[1] - self.width
        done = [n >= limit for limit in self.limits]
        if any(self.stops):
            rows = input_ids[:, self.width :].tolist()
            done = [d or self.stopper.hit(row, stop) for d, row, stop in zip(done, rows, self.stops)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowConstraints(LogitsProcessor):
    """Each request's logits constraint, given the tokens that request generated so far (before sampling)."""

    def __init__(self, batch: list[Request], prompt_width: int):
        self.constraints = [r.constraint for r in batch]
        self.width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids[:, self.width :].tolist()
        for i, (c, g) in enumerate(zip(self.constraints, rows)):
            ids = c.score_ids(g) if hasattr(c, "score_ids") else None
            if ids:  # (BatchPrompt's label slots record the labels' logits)
                c.record(len(g), scores[i, ids].tolist())
        return constrain(scores, [None if c is None else c.allowed_tokens(g) for c, g in zip(self.constraints, rows)])


class _RowSampler(LogitsProcessor):
    """Each row's token under its own settings: greedy, or temperature / top-k / top-p with one
    torch.Generator per sampled row.

    It returns -inf everywhere but the chosen token, so generate's greedy step picks exactly that token.
    """

    def __init__(self, params: list[SamplingParams], seeds: list[int], device: str):
        self.params = params
        self.generators = [None if p.greedy else row_generator(seed, device) for p, seed in zip(params, seeds)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = sample_tensor(scores, self.params, self.generators)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), chosen] = 0.0
        return out
