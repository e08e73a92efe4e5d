"""batchrun's engine: executes a Plan with a paged, prefix-shared KV cache and continuous batching.

Each step: the scheduler describes the work (decodes, then prefill packs in plan order, within the KV
budget), the runner computes it in one packed forward pass, per-request logits constraints are applied (a
grammar's masks computed on the CPU while the device runs the step: ``engine.masks``),
the sampler draws each row's next token (under the request's own sampling settings, or the engine's), the
scheduler records it (ending rows at EOS or their limit), and the engine ends rows whose text reached one of
their stop strings. Completions stream out as rows finish.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchrun.engine.collector import frozen
from batchrun.engine.cpu_threads import few
from batchrun.engine.kv import KVManager
from batchrun.engine.loader import LoadedModel
from batchrun.engine.masks import MaskPipeline, Masks, uses_pool
from batchrun.engine.requests import Completion, Interrupted, Request, SamplingParams
from batchrun.engine.runner import Runner
from batchrun.engine.sampling import LogprobLog, apply_mask_bits, logprobs_of, row_generator, sample_tensor
from batchrun.engine.scheduler import Scheduler
from batchrun.engine.step import Step
from batchrun.engine.stopping import Stopper
from batchrun.errors import RuntimeFailure
from batchrun.plan.plan import Plan

log = logging.getLogger("batchrun")


def overlaps(requests: Sequence[Request], logprobs: int | None) -> bool:
    """Does the engine overlap steps for ``requests``: plan and launch step N+1 before reading back step N's
    tokens (the device then never waits for the host)? Not with grammars or logprobs, which need each token
    on the host before the next step; ``BATCHRUN_OVERLAP=0`` turns it off (one step at a time)."""
    return (logprobs is None and all(r.constraint is None for r in requests)
            and os.environ.get("BATCHRUN_OVERLAP", "1") != "0")


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
            # (The objects alive before the run out of the collector's way, ``engine.collector``; on a GPU, one
            # torch CPU thread, ``engine.cpu_threads``.)
            with frozen(), few(self.loaded.device):
                yield from self._run(requests, plan)
        except Interrupted:
            log.info("stopped in the middle of a step; rows in flight are recomputed on resume")
        finally:
            self.runner.interrupt = None

    def _run(self, requests: list[Request], plan: Plan) -> Iterator[list[Completion]]:
        kv = KVManager(plan.prefixes, self.num_blocks, self.block_size)
        sched = Scheduler(plan, requests, kv, self.step_tokens, self.stopper.eos_ids, self.initial_estimate)
        greedy = all((r.sampling or self.sampling).greedy for r in requests)
        run = _RunState(requests, sched, LogprobLog(self.loaded.tokenizer) if self.sampling.logprobs is not None
                        else None, greedy, MaskPipeline(self.runner.vocab, self.loaded.device != "cpu", greedy))
        overlap = overlaps(requests, self.sampling.logprobs)
        steps = self._steps(run, kv, overlap)
        yield from run.masks.launching(steps) if uses_pool(r.constraint for r in requests) else steps

    def _steps(self, run: _RunState, kv: KVManager, overlap: bool) -> Iterator[list[Completion]]:
        sched = run.sched
        inflight: _Launched | None = None
        peak = launches = 0
        while True:
            step = None if sched.finished() else sched.next_step()
            if step is None and inflight is None:
                break
            peak = max(peak, kv.used_tokens)
            launched = None
            if step is not None and step.seqs:
                launched = self._launch(step, run, inflight)
                sched.launched(step)
                launches += 1
            if inflight is not None:
                yield self._resolve(inflight, run)
            elif launched is None:
                failed = self._errors(sched)
                if failed:
                    yield failed
                    continue
                raise RuntimeFailure("the scheduler found no work it could admit (KV budget too small?)")
            if launched is not None and not overlap:
                yield self._resolve(launched, run)
                launched = None
            inflight = launched
        failed = self._errors(sched)
        if failed:
            yield failed
        self.stats = {"steps": launches, "preemptions": sched.preemptions, "prefix_evictions": kv.evictions,
                      "kv_peak_tokens": peak, "kv_budget_tokens": kv.budget, "mask_wait_s": run.mask_wait}
        log.debug("engine: %s", self.stats)

    def _launch(self, step: Step, run: _RunState, inflight: _Launched | None) -> _Launched:
        """Run the step and draw its tokens on the device; nothing here waits for the device (but masks)."""
        keys = step.sample_keys
        reqs = [run.requests[k.row] for k in keys]
        constraints = [r.constraint for r in reqs]
        masks = forced = None
        if any(c is not None for c in constraints):  # computed on the CPU once the GPU runs the step
            masks = run.masks.launch(keys, constraints, [run.sched.generated(k) for k in keys])
        logits = self.runner.forward(step, None if inflight is None else inflight.tokens)
        raw = logits
        scored = _scored(raw, constraints, [run.sched.generated(k) for k in keys]) if masks is not None else None
        if masks is not None:
            packed, rows, forced, waited = masks.wait()  # (forced: the forced runs' lookup, while the step finishes)
            run.mask_wait += waited  # (what the masks add to the step)
            logits = apply_mask_bits(logits, packed, rows)
        if run.greedy:  # (every row greedy: the common case, kept cheap)
            tokens = logits.argmax(-1)
        else:
            params = [r.sampling or self.sampling for r in reqs]
            for k, r, p in zip(keys, reqs, params):
                if not p.greedy and k not in run.generators:
                    run.generators[k] = row_generator(r.seed, self.loaded.device)
            tokens = sample_tensor(logits, params, [run.generators.get(k) for k in keys])
        lazy = masks is not None and bool(masks.lazy)  # (rows drawn without their masks: ``Masks.settle``)
        return _Launched(step, tokens, *_to_host(tokens), raw if run.lps is not None else None, scored, forced,
                         masks if lazy else None, logits if lazy else None)

    def _resolve(self, launched: _Launched, run: _RunState) -> list[Completion]:
        """Read a launched step's tokens back, record them, and finish the rows that ended."""
        if launched.forced is not None:
            launched.forced.result()  # (the forced runs ``forced_after`` reads; looked up while the device works)
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.host.tolist()
        if launched.masks is not None:  # (rows drawn without their mask: checked, and drawn again if need be)
            launched.masks.settle(tokens, launched.logits)
        sched, requests, lps = run.sched, run.requests, run.lps
        step = launched.step
        if lps is not None and tokens:
            drawn = dict(zip(step.sample_keys, zip(*logprobs_of(launched.raw, tokens, self.sampling.logprobs))))
        if launched.scored is not None:
            _record(*launched.scored)
        events = sched.resolve(step, tokens)
        done = self._errors(sched)
        going = []  # (the rows that go on: their next masks start now)
        for e in events:
            ended = e.ended
            if lps is not None:
                lps.add(e.key, *drawn[e.key])
            c = requests[e.key.row].constraint
            # Tokens a constraint forces after the one just drawn (a grammar: found with its mask, while the
            # device ran the step) are appended now and computed in the next step with it. With logprobs asked for, each
            # is drawn instead, to have its logprob.
            if not ended and lps is None and hasattr(c, "forced_after"):
                forced = c.forced_after(sched.generated(e.key))
                if forced:
                    ended = sched.force(e.key, forced)
            stop = (requests[e.key.row].sampling or self.sampling).stop
            if ended or self.stopper.hit(sched.generated(e.key), stop):
                run.generators.pop(e.key, None)
                r = sched.finish(e.key)
                out = self.stopper.finish(r.req.key, r.generated, r.req.max_tokens, stop)
                done.append(out if lps is None else lps.attach(out, e.key))
            elif c is not None:
                going.append((e.key, c))
        if going:
            run.masks.start([k for k, _ in going], [c for _, c in going], [sched.generated(k) for k, _ in going])
        return done

    @staticmethod
    def _errors(sched: Scheduler) -> list[Completion]:
        return [Completion(req.key, [], "", "error", error=message) for req, message in sched.take_errors()]


@dataclass
class _RunState:
    """What one run's steps share."""

    requests: list[Request]
    sched: Scheduler
    lps: LogprobLog | None
    greedy: bool  # every request is greedy
    masks: MaskPipeline
    generators: dict = field(default_factory=dict)  # a sampled row's torch.Generator
    mask_wait: float = 0.0


@dataclass
class _Launched:
    """A step on its way: its tokens on the device, their copy to the host, and the event that says the copy
    is there (None on the CPU)."""

    step: Step
    tokens: torch.Tensor
    host: torch.Tensor
    ready: Any
    raw: torch.Tensor | None  # the model's logits (for logprobs)
    scored: tuple | None = None  # logits some constraints asked to record (``_scored``)
    forced: Any = None  # the forced runs' lookup (``masks.Later``, or a Future from the mask worker)
    masks: Masks | None = None  # the step's masks, when some rows were drawn without theirs
    logits: torch.Tensor | None = None  # (then: the logits they were drawn from)


def _scored(raw: torch.Tensor, constraints: Sequence[Any], generated: Sequence[Sequence[int]]) -> tuple | None:
    """The logits that constraints with ``score_ids`` (BatchPrompt's label slots) ask for at this step, in one
    gather on the device: (who asked, at which output position, how many, the values)."""
    asks, rows, cols = [], [], []
    for i, (c, gen) in enumerate(zip(constraints, generated)):
        ids = c.score_ids(gen) if hasattr(c, "score_ids") else None
        if ids:
            asks.append((c, len(gen), len(ids)))
            rows += [i] * len(ids)
            cols += list(ids)
    if not asks:
        return None
    index = torch.tensor([rows, cols], device=raw.device)
    return asks, raw[index[0], index[1]]


def _record(asks: list, values: torch.Tensor) -> None:
    flat, at = values.tolist(), 0
    for c, position, n in asks:
        c.record(position, flat[at : at + n])
        at += n


def _to_host(tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
    if tokens.device.type == "cpu":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
