"""The scheduler: decides each step's work from the plan, within the KV budget. Never touches tensors.

A step is one forward pass over packed sequences:
1. one token for every row that is decoding;
2. the next tokens of work already started (a shared prefix or a row's prompt longer than what fitted in
   earlier steps: chunked prefill, SARATHI-style), first come first served;
3. new work in plan order — shared prefixes before their members — admitted while the projected future
   peak KV of the running set (``plan.budget.fits``) plus the live shared prefixes fits the budget.
The runner computes the step; ``commit`` takes the sampled tokens, finishes rows (EOS, stop strings,
max_tokens) and frees their KV — a shared prefix's when its last member finishes. If real outputs outgrow
the estimates and the pool runs dry, the newest decoding row is preempted: its KV is freed and it is
recomputed later from its prompt and the tokens it already produced. A row that cannot fit the budget even
alone finishes with an error instead of stopping the job.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from batchrun.engine.blocks import BlockAllocator, OutOfBlocks, Segment
from batchrun.engine.requests import Completion, Request
from batchrun.engine.stopping import Stopper
from batchrun.engine.work import Job, RowState, Work
from batchrun.plan.budget import fits
from batchrun.plan.order import OutputEstimator
from batchrun.plan.pack import PREFIX


class Scheduler:
    def __init__(self, plan, requests: list[Request], allocator: BlockAllocator, stopper: Stopper,
                 step_tokens: int, initial_estimate: float = 1.0):
        self.plan = plan
        self.alloc = allocator
        self.stopper = stopper
        self.step_tokens = step_tokens
        self.budget = allocator.num_blocks * allocator.block_size
        starts = plan.prefixes.row_start
        self.rows = [RowState(r, int(s), self._chain(i)) for i, (r, s) in enumerate(zip(requests, starts))]
        self.prefix_refs = plan.prefixes.members.astype(np.int64).copy()
        self.prefix_seg: dict[int, Segment] = {}
        self.failed_prefixes: set[int] = set()
        self._prefix_started: set[int] = set()  # (an evicted prefix is recomputed for its members, not here)
        self.estimator = OutputEstimator(np.array([r.max_tokens for r in requests], dtype=np.int64),
                                         initial_fraction=initial_estimate)
        self._packs = plan.packs()
        self._pending: deque = deque()
        self._jobs: dict[int, Job] = {}  # started, unfinished computations, in start order
        self._requeue: deque[int] = deque()
        self._running: dict[int, None] = {}  # rows holding KV, in admission order
        self._admitted = 0
        self._works: list[Work] = []
        self._failed: list[tuple[int, str]] = []
        self.preemptions = 0
        self.prefix_evictions = 0
        self.steps = 0

    def _chain(self, row: int) -> list[int]:
        return self._ancestry(int(self.plan.prefixes.row_prefix[row]))

    def _ancestry(self, p: int) -> list[int]:
        """Shared prefix ``p`` and the prefixes enclosing it, outermost first ([] for p = -1)."""
        chain = []
        while p >= 0:
            chain.append(p)
            p = int(self.plan.prefixes.parent[p])
        return chain[::-1]

    def finished(self) -> bool:
        return not self._running and not self._jobs and not self._requeue and not self._next_item()

    def _next_item(self) -> tuple | None:
        """The first pending pack item that still means work (later chunks of started work are dropped)."""
        while self._fill_pending():
            kind, ident, _, _ = self._pending[0]
            stale = (ident in self._prefix_started or ident in self.failed_prefixes) if kind == PREFIX \
                else self.rows[ident].started
            if not stale:
                return self._pending[0]
            self._pending.popleft()
        return None

    def _fill_pending(self) -> bool:
        if not self._pending:
            nxt = next(self._packs, None)
            if nxt is None:
                return False
            self._pending.extend(tuple(x) for x in nxt.tolist())
        return True

    # -- deciding a step -----------------------------------------------------------------------------------

    def next_step(self) -> list[Work]:
        """The next step's work (empty when nothing can run: the job is finished, or only errors were left)."""
        self.steps += 1
        works = self._works = []
        for i in list(self._running):
            r = self.rows[i]
            if r.running and r.generated and i not in self._jobs:
                work = self._decode_work(i, r)
                if work is not None:
                    works.append(work)
        budget = self.step_tokens
        for key in list(self._jobs):  # work already started, oldest first
            if budget <= 0:
                break
            budget -= self._advance(key, budget)
        while budget > 0:
            key = self._admit_next()
            if key is None:
                break
            budget -= self._advance(key, budget)
        return works

    def take_errors(self) -> list[Completion]:
        """Rows that failed since the last call. Their shared prefixes are let go only now, after the step
        ran, so no block is reused within the step that still reads it."""
        failed, self._failed = self._failed, []
        out = []
        for i, message in failed:
            self._release_prefixes(self.rows[i])
            out.append(Completion(self.rows[i].req.index, [], "", "error", error=message))
        return out

    def _admit_next(self) -> int | None:
        """Start the next piece of work if the KV budget admits it; its key, or None."""
        while True:
            if self._requeue:
                i = self._requeue[0]
                missing = self._missing_prefix(self.rows[i])
                if missing is not None:  # its shared prefix was evicted meanwhile: recompute it first
                    if not self._fits_prefix(missing):
                        if self._running or self._jobs or self._failed or \
                                self._evict_idle_prefixes(set(self.rows[i].chain)):
                            return None
                        self._requeue.popleft()
                        self._fail(i, self._outgrew_message(self.rows[i]))
                        continue
                    return self._start_prefix(missing)
                if not self._fits_row(self.rows[i]):
                    if self._running or self._jobs or self._failed:
                        return None  # wait for memory
                    if self._evict_idle_prefixes(set(self.rows[i].chain)):
                        continue
                    self._requeue.popleft()  # alone it no longer fits: it has outgrown the budget
                    self._fail(i, self._outgrew_message(self.rows[i]))
                    continue
                self._requeue.popleft()
                r = self.rows[i]
                self._start_row(i, list(r.req.prompt_ids[r.own_start :]) + r.generated)
                return i
            item = self._next_item()
            if item is None:
                return None
            kind, ident, _, _ = item
            if kind == PREFIX:
                parent = int(self.plan.prefixes.parent[ident])
                if parent in self.failed_prefixes:  # nested in a prefix that could not fit
                    self._pending.popleft()
                    self.failed_prefixes.add(ident)
                    continue
                missing = next((q for q in self._prefix_chain(ident) if q not in self.prefix_seg), None)
                if missing is not None:  # an enclosing prefix was evicted: recompute it first
                    if not self._fits_prefix(missing):
                        if self._blocked(keep=set(self._ancestry(ident))):
                            continue
                        return None
                    return self._start_prefix(missing)
                if not self._fits_prefix(ident):
                    if self._blocked(keep=set(self._ancestry(ident))):
                        continue
                    return None
                self._pending.popleft()
                return self._start_prefix(ident)
            r = self.rows[ident]
            if any(p in self.failed_prefixes for p in r.chain):
                self._pending.popleft()
                self._fail(ident, "its shared prefix does not fit the KV budget")
                continue
            missing = self._missing_prefix(r)
            if missing is not None:  # evicted while its members waited: recompute it first
                if not self._fits_prefix(missing):
                    if self._blocked(keep=set(r.chain)):
                        continue
                    return None
                return self._start_prefix(missing)
            if not self._fits_row(r):
                if self._blocked(keep=set(r.chain)):
                    continue
                return None
            self._pending.popleft()
            self._start_row(ident, list(r.req.prompt_ids[r.own_start :]))
            return ident

    def _blocked(self, keep: set[int]) -> bool:
        """The next piece of work does not fit. Wait (False), unless nothing runs that could free memory:
        then shared prefixes held for waiting rows are evicted (recomputed when needed), or, with none left,
        the work fails; either way the caller tries again (True)."""
        if self._running or self._jobs or self._failed or self._works:
            return False  # wait: this step's work (and failed rows' prefixes) free up after the step
        if self._evict_idle_prefixes(keep):
            return True
        kind, ident, _, _ = self._pending.popleft()
        if kind == PREFIX:
            self.failed_prefixes.add(ident)
        else:
            r = self.rows[ident]
            need = r.own_tokens + r.req.max_tokens
            self._fail(ident, f"needs about {need} KV tokens beyond its shared prefixes; the KV budget is "
                              f"{self.budget} (engine.kv_budget_tokens)")
        return True

    def _missing_prefix(self, r: RowState) -> int | None:
        """The outermost shared prefix of ``r`` whose KV is not held (evicted), if any."""
        return next((p for p in r.chain if p not in self.prefix_seg), None)

    def _evict_idle_prefixes(self, keep: set[int]) -> bool:
        """Free the KV of shared prefixes that no running row, no prefix being computed and nothing in
        ``keep`` uses; True if any was freed."""
        in_use = set(keep)
        for i in self._running:
            in_use.update(self.rows[i].chain)
        for key in [*self._jobs, *(w.key for w in self._works)]:  # (a prefix written in this step stays)
            if key < 0:
                in_use.update(self._ancestry(-1 - key))
        idle = [p for p in self.prefix_seg if p not in in_use]
        for p in idle:
            self.alloc.release(self.prefix_seg.pop(p))
        self.prefix_evictions += len(idle)
        return bool(idle)

    def _fits_row(self, r: RowState) -> bool:
        cur, rem = self._projection()
        bs = self.alloc.block_size
        left = max(int(np.ceil(r.req.max_tokens * self.estimator.fraction)) - len(r.generated), 1)
        return fits(np.array(cur + [-(-r.own_tokens // bs) * bs]), np.array(rem + [left]),
                    self._prefix_tokens(), self.budget, bs)

    def _fits_prefix(self, p: int) -> bool:
        cur, rem = self._projection()
        bs = self.alloc.block_size
        size = int(self.plan.prefixes.end[p] - self.plan.prefixes.start[p])
        return fits(np.array(cur), np.array(rem), self._prefix_tokens() + -(-size // bs) * bs, self.budget, bs)

    def _projection(self) -> tuple[list[int], list[int]]:
        frac = self.estimator.fraction
        bs = self.alloc.block_size
        cur, rem = [], []
        for i in self._running:
            r = self.rows[i]
            cur.append(-(-r.own_tokens // bs) * bs)
            rem.append(max(int(np.ceil(r.req.max_tokens * frac)) - len(r.generated), 0))
        return cur, rem

    def _prefix_tokens(self) -> int:
        bs = self.alloc.block_size
        pre = self.plan.prefixes
        return sum(-(-int(pre.end[p] - pre.start[p]) // bs) * bs for p in self.prefix_seg)

    def _start_row(self, i: int, tokens: list[int]) -> None:
        r = self.rows[i]
        r.started = r.running = True
        r.order = self._admitted
        self._admitted += 1
        self._running[i] = None
        self._jobs[i] = Job(tokens, r.own_start)

    def _start_prefix(self, p: int) -> int:
        pre = self.plan.prefixes
        start, end = int(pre.start[p]), int(pre.end[p])
        rep = self.rows[self.plan.trie.rep_row(int(pre.node[p]))]
        self._prefix_started.add(p)
        self.prefix_seg[p] = Segment()
        self._jobs[-1 - p] = Job(list(rep.req.prompt_ids[start:end]), start)
        return -1 - p

    def _advance(self, key: int, budget: int) -> int:
        """Compute up to ``budget`` more tokens of a started job; returns how many."""
        job = self._jobs[key]
        n = min(len(job.tokens) - job.done, budget)
        tokens = job.tokens[job.done : job.done + n]
        pos = job.start_pos + job.done
        job.done += n
        last = job.done == len(job.tokens)
        if last:
            del self._jobs[key]
        if key < 0:
            p = -1 - key
            seg = self.prefix_seg.get(p)
            if seg is None:  # every member failed or finished meanwhile: nothing needs it any more
                return 0
            slots = self._reserve(seg, n, protect=None, keep=set(self._ancestry(p)))
            if slots is None:  # the prefix cannot fit even alone: its members fail as they come
                self.failed_prefixes.add(p)
                self.alloc.release(self.prefix_seg.pop(p))
                self._jobs.pop(key, None)
                return n
            context = [(self.prefix_seg[q], self.prefix_seg[q].length) for q in self._prefix_chain(p)]
            self._works.append(Work(key, tokens, pos, context + [(seg, seg.length)], slots, False))
        else:
            r = self.rows[key]
            slots = self._reserve(r.own, n, protect=key, keep=set(r.chain))
            if slots is None:
                self._outgrown(key)
                return n
            self._works.append(Work(key, tokens, pos, self._context(r), slots, last))
        return n

    def _prefix_chain(self, p: int) -> list[int]:
        return self._ancestry(int(self.plan.prefixes.parent[p]))

    def _context(self, r: RowState) -> list[tuple[Segment, int]]:
        return [(self.prefix_seg[p], self.prefix_seg[p].length) for p in r.chain] + [(r.own, r.own.length)]

    def _decode_work(self, i: int, r: RowState) -> Work | None:
        slots = self._reserve(r.own, 1, protect=i, keep=set(r.chain))
        if slots is None:
            self._outgrown(i)
            return None
        pos = len(r.req.prompt_ids) + len(r.generated) - 1
        return Work(i, [r.generated[-1]], pos, self._context(r), slots, True, decode=True)

    def _reserve(self, seg: Segment, n: int, protect: int | None, keep: set[int]) -> list[int] | None:
        """Slots for ``n`` more tokens of ``seg``. If the pool is dry: preempt another row, else evict shared
        prefixes nobody running needs (not ``keep``). None if even that cannot make room."""
        while True:
            try:
                return self.alloc.reserve(seg, n)
            except OutOfBlocks:
                if not self._preempt(protect) and not self._evict_idle_prefixes(keep):
                    return None

    def _preempt(self, protect: int | None) -> bool:
        """Free the KV of the newest running row other than ``protect`` (decoding rows first); the row is
        recomputed later from its prompt and what it generated."""
        victims = [i for i in self._running if i != protect]
        if not victims:
            return False
        i = max(victims, key=lambda k: (k not in self._jobs, self.rows[k].order))
        r = self.rows[i]
        self._works[:] = [w for w in self._works if w.key != i]  # drop its work in this step, if any
        self._jobs.pop(i, None)
        self.alloc.release(r.own)
        r.own, r.running = Segment(), False
        self._running.pop(i, None)
        self._requeue.appendleft(i)
        self.preemptions += 1
        return True

    def _outgrown(self, i: int) -> None:
        """Row ``i`` alone needs more KV than the pool holds: it fails, the job goes on."""
        r = self.rows[i]
        self._works[:] = [w for w in self._works if w.key != i]
        self._jobs.pop(i, None)
        self.alloc.release(r.own)
        r.own, r.running = Segment(), False
        self._running.pop(i, None)
        self._fail(i, self._outgrew_message(r))

    def _outgrew_message(self, r: RowState) -> str:
        return (f"outgrew the KV budget of {self.budget} tokens after {len(r.generated)} output tokens "
                "(engine.kv_budget_tokens)")

    # -- after the step ------------------------------------------------------------------------------------

    def commit(self, works: list[Work], sampled: dict[int, int]) -> list[Completion]:
        """Record each sampling row's token; return the rows that finished (and rows failed meanwhile)."""
        finished = self.take_errors()
        for w in works:
            if w.key < 0 or w.key not in sampled or not self.rows[w.key].running:
                continue
            r = self.rows[w.key]
            r.generated.append(sampled[w.key])
            t = r.generated[-1]
            if t in self.stopper.eos_ids or len(r.generated) >= r.req.max_tokens or self.stopper.hit(r.generated):
                finished.append(self._finish(w.key))
        return finished

    def _release_prefixes(self, r: RowState) -> None:
        for p in r.chain:
            self.prefix_refs[p] -= 1
            if self.prefix_refs[p] == 0 and p in self.prefix_seg:
                self.alloc.release(self.prefix_seg.pop(p))
                self._jobs.pop(-1 - p, None)

    def _finish(self, i: int) -> Completion:
        r = self.rows[i]
        r.running = False
        self._running.pop(i, None)
        self.alloc.release(r.own)
        self._release_prefixes(r)
        self.estimator.observe(r.req.max_tokens, len(r.generated))
        return self.stopper.finish(r.req.index, r.generated, r.req.max_tokens)

    def _fail(self, i: int, message: str) -> None:
        self.rows[i].started = True
        self._failed.append((i, message))
