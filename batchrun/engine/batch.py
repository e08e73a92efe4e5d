"""batchrun's engine: executes a Plan with a paged, prefix-shared KV cache and continuous batching.

Each step: the scheduler describes the work (decodes, then prefill packs in plan order, within the KV
budget), the runner computes it in one packed forward pass, per-request logits constraints are applied (a
grammar's masks computed in a worker thread while the GPU runs the step),
the sampler draws each row's next token (under the request's own sampling settings, or the engine's), the
scheduler records it (ending rows at EOS or their limit), and the engine ends rows whose text reached one of
their stop strings. Completions stream out as rows finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from batchrun.engine.constraints import forced_for, mask_bits
from batchrun.engine.kv import KVManager
from batchrun.engine.loader import LoadedModel
from batchrun.engine.requests import Completion, Interrupted, Request, SamplingParams
from batchrun.engine.runner import Runner
from batchrun.engine.sampling import LogprobLog, apply_mask_bits, logprobs_of, row_generator, sample
from batchrun.engine.scheduler import Scheduler
from batchrun.engine.stopping import Stopper
from batchrun.errors import RuntimeFailure
from batchrun.plan.plan import Plan

log = logging.getLogger("batchrun")
_WORKER: list[ThreadPoolExecutor] = []  # one thread computing grammar masks while the GPU runs a step


def _mask_worker() -> ThreadPoolExecutor:
    if not _WORKER:
        _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="batchrun-masks"))
    return _WORKER[0]


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
        self.stats: dict[str, float] = {}

    def run(self, requests: Sequence[Request], plan: Plan,
            interrupt: Callable[[], bool] | None = None) -> Iterator[list[Completion]]:
        """Run every request (``plan`` was built over ``requests``, in this order); yield finished ones.
        Every step yields (maybe nothing), so the caller can stop between steps; ``interrupt`` is polled
        inside a step too: when it says stop, the run ends at once, dropping the step's work."""
        requests = list(requests)
        if not requests:
            return
        self.runner.interrupt = interrupt
        try:
            yield from self._run(requests, plan)
        except Interrupted:
            log.info("stopped in the middle of a step; rows in flight are recomputed on resume")
        finally:
            self.runner.interrupt = None

    def _run(self, requests: list[Request], plan: Plan) -> Iterator[list[Completion]]:
        kv = KVManager(plan.prefixes, self.num_blocks, self.block_size)
        sched = Scheduler(plan, requests, kv, self.step_tokens, self.stopper.eos_ids, self.initial_estimate)
        generators = {}
        peak = 0
        k_top = self.sampling.logprobs
        lps = LogprobLog(self.loaded.tokenizer) if k_top is not None else None
        vocab = self.runner.vocab
        mask_wait = 0.0
        while not sched.finished():
            step = sched.next_step()
            peak = max(peak, kv.used_tokens)
            if not step.seqs:
                failed = self._errors(sched)
                if failed:
                    yield failed
                    continue
                raise RuntimeFailure("the scheduler found no work it could admit (KV budget too small?)")
            keys = step.sample_keys
            reqs = [requests[k.row] for k in keys]
            constraints = [r.constraint for r in reqs]
            masks = None
            if any(c is not None for c in constraints):  # computed on the CPU while the GPU runs the step
                masks = _mask_worker().submit(mask_bits, constraints, [sched.generated(k) for k in keys], vocab)
            logits = self.runner.forward(step)
            tokens: list[int] = []
            if keys:
                raw = logits
                if masks is not None:
                    t = time.perf_counter()
                    rows, bits = masks.result()
                    mask_wait += time.perf_counter() - t  # (what the masks add to the step)
                    logits = apply_mask_bits(logits, rows, bits)
                params = [r.sampling or self.sampling for r in reqs]
                for k, r, p in zip(keys, reqs, params):
                    if not p.greedy and k not in generators:
                        generators[k] = row_generator(r.seed, self.loaded.device)
                tokens = sample(logits, params, [generators.get(k) for k in keys])
                if lps is not None:
                    drawn = dict(zip(keys, zip(*logprobs_of(raw, tokens, k_top))))
            events = sched.commit(step, tokens)
            done = self._errors(sched)
            # Tokens a grammar forces after the one just drawn are appended now and computed in the next step
            # with it (with logprobs asked for, each is drawn instead, to have its logprob).
            forced = {}
            if masks is not None and lps is None:
                grown = [e.key for e in events if not e.ended and requests[e.key.row].constraint is not None]
                forced = dict(zip(grown, forced_for([requests[k.row].constraint for k in grown],
                                                    [sched.generated(k) for k in grown])))
            for e in events:
                ended = e.ended
                if lps is not None:
                    lps.add(e.key, *drawn[e.key])
                if forced.get(e.key):
                    ended = sched.force(e.key, forced[e.key])
                stop = (requests[e.key.row].sampling or self.sampling).stop
                if ended or self.stopper.hit(sched.generated(e.key), stop):
                    generators.pop(e.key, None)
                    r = sched.finish(e.key)
                    out = self.stopper.finish(r.req.key, r.generated, r.req.max_tokens, stop)
                    done.append(out if lps is None else lps.attach(out, e.key))
            yield done
        self.stats = {"steps": sched.steps, "preemptions": sched.preemptions, "prefix_evictions": kv.evictions,
                      "kv_peak_tokens": peak, "kv_budget_tokens": kv.budget, "mask_wait_s": mask_wait}
        log.debug("engine: %s", self.stats)

    @staticmethod
    def _errors(sched: Scheduler) -> list[Completion]:
        return [Completion(req.key, [], "", "error", error=message) for req, message in sched.take_errors()]
