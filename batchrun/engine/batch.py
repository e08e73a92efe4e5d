"""batchrun's engine: executes a Plan with a paged, prefix-shared KV cache and continuous batching.

Each step the scheduler picks the work (decodes, then prefill packs in plan order, within the KV budget),
the runner computes it in one packed forward pass, the sampler draws each row's next token, and the
scheduler finishes rows. Completions stream out as rows finish.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from batchrun.engine.blocks import BlockAllocator
from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Completion, Request, SamplingParams
from batchrun.engine.runner import Runner
from batchrun.engine.sampling import row_generator, sample
from batchrun.engine.scheduler import Scheduler
from batchrun.engine.stopping import Stopper
from batchrun.errors import RuntimeFailure

log = logging.getLogger("batchrun")


class BatchEngine:
    name = "batchrun"

    def __init__(self, loaded: LoadedModel, sampling: SamplingParams, kv_budget_tokens: int, block_size: int = 16,
                 step_tokens: int = 8192, initial_estimate: float = 1.0):
        self.loaded = loaded
        self.sampling = sampling
        self.block_size = block_size
        self.step_tokens = step_tokens
        self.num_blocks = kv_budget_tokens // block_size
        self.runner = Runner(loaded, self.num_blocks * block_size)
        self.stopper = Stopper(loaded.tokenizer, sampling.stop, [] if sampling.ignore_eos else loaded.eos_ids)
        self.initial_estimate = initial_estimate  # < 1 admits more work at first (and may preempt)
        self.stats: dict[str, int] = {}

    def run(self, requests: Sequence[Request], plan) -> Iterator[list[Completion]]:
        """Run every request (``plan`` was built over ``requests``, in this order); yield finished rows."""
        requests = list(requests)
        if not requests:
            return
        sched = Scheduler(plan, requests, BlockAllocator(self.num_blocks, self.block_size), self.stopper,
                          self.step_tokens, self.initial_estimate)
        generators = {}
        peak = 0
        while not sched.finished():
            works = sched.next_step()
            peak = max(peak, sched.alloc.used_tokens)
            if not works:
                failed = sched.take_errors()
                if failed:
                    yield failed
                    continue
                raise RuntimeFailure("the scheduler found no work it could admit (KV budget too small?)")
            logits = self.runner.forward(works, self.block_size)
            keys = [w.key for w in works if w.sample]
            gens = None
            if not self.sampling.greedy:
                for k in keys:
                    if k not in generators:
                        generators[k] = row_generator(requests[k].seed, self.loaded.device)
                gens = [generators[k] for k in keys]
            tokens = sample(logits, self.sampling, gens) if keys else []
            # Every step yields (maybe nothing), so the job can stop between steps on a signal.
            yield sched.commit(works, dict(zip(keys, tokens)))
        self.stats = {"steps": sched.steps, "preemptions": sched.preemptions, "kv_peak_tokens": peak,
                      "kv_budget_tokens": self.num_blocks * self.block_size}
        log.debug("engine: %d steps, %d preemptions", sched.steps, sched.preemptions)


def default_kv_budget(loaded: LoadedModel, requested: int | None) -> int:
    from batchrun.engine.loader import auto_kv_budget, model_facts
    from batchrun.spec import EngineSpec, ModelSpec

    if requested:
        return requested
    device = "cpu" if loaded.device == "cpu" else "cuda"
    facts = model_facts(ModelSpec(path=loaded.resolved, dtype=loaded.dtype), EngineSpec(device=device), loaded.resolved)
    budget = auto_kv_budget(facts, loaded.device)
    if loaded.device == "cpu":  # the pool is allocated up front: keep it modest on CPU
        budget = min(budget, (2 << 30) // facts.kv_bytes_per_token)
    return int(np.int64(budget))
