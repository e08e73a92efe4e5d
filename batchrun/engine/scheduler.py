"""The scheduler: decides each step's work from the plan, within the KV budget. Never touches tensors.

A step is one forward pass over packed sequences: one token for every row that is decoding, plus prefill
work taken in plan order from the plan's packs (shared prefixes before their members; long prompts in
chunks), admitted while the projected future peak KV of the running set fits the budget
(``plan.budget.fits``). The runner computes the step; ``commit`` takes the sampled tokens, finishes rows
(EOS, stop strings, max_tokens) and frees their KV — a shared prefix's when its last member finishes.
If real outputs outgrow the estimates and the pool runs dry, the newest decoding row is preempted: its KV
is freed and it is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from batchrun.engine.blocks import BlockAllocator, OutOfBlocks, Segment
from batchrun.engine.requests import Completion, Request
from batchrun.engine.stopping import Stopper
from batchrun.plan.budget import fits
from batchrun.plan.order import OutputEstimator
from batchrun.plan.pack import PREFIX


@dataclass
class Work:
    """One sequence's part of a step."""

    key: int  # the row (plan index), or -1 - prefix id for a shared prefix
    tokens: list[int]
    start_pos: int  # position of tokens[0]
    # Every segment it attends to, outermost first (its own last, holding the new tokens), with the number of
    # tokens it sees in each: a snapshot, since a later chunk of the same row may grow the segment this step.
    context: list[tuple[Segment, int]]
    slots: list[int]  # pool slots of the new tokens
    sample: bool  # a next token is drawn from its last position


@dataclass
class _Row:
    req: Request
    own_start: int
    chain: list[int]  # shared prefixes, outermost first
    own: Segment = field(default_factory=Segment)
    computed: int = 0  # tokens of the own segment computed (prompt part, then recomputed output)
    generated: list[int] = field(default_factory=list)
    running: bool = False
    order: int = 0  # admission counter (newest is preempted first)

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)


class Scheduler:
    def __init__(self, plan, requests: list[Request], allocator: BlockAllocator, stopper: Stopper,
                 step_tokens: int, initial_estimate: float = 1.0):
        self.plan = plan
        self.alloc = allocator
        self.stopper = stopper
        self.step_tokens = step_tokens
        self.budget = allocator.num_blocks * allocator.block_size
        pre = plan.prefixes
        row_start = pre.row_start
        self.rows = [_Row(r, int(row_start[i]), self._chain(i)) for i, r in enumerate(requests)]
        self.prefix_refs = pre.members.astype(np.int64).copy()
        self.prefix_seg: dict[int, Segment] = {}
        self.estimator = OutputEstimator(np.array([r.max_tokens for r in requests], dtype=np.int64),
                                         initial_fraction=initial_estimate)
        self._packs = plan.packs()
        self._pending: deque = deque()
        self._requeue: deque[int] = deque()
        self._admitted = 0
        self._running: dict[int, None] = {}  # rows holding KV, in admission order
        self._works: list[Work] = []
        self.preemptions = 0
        self.steps = 0

    def _chain(self, row: int) -> list[int]:
        pre = self.plan.prefixes
        chain, p = [], int(pre.row_prefix[row])
        while p >= 0:
            chain.append(p)
            p = int(pre.parent[p])
        return chain[::-1]

    # -- deciding a step -----------------------------------------------------------------------------------

    def finished(self) -> bool:
        return not self._running and not self._requeue and not self._fill_pending()

    def _fill_pending(self) -> bool:
        if self._pending:
            return True
        nxt = next(self._packs, None)
        if nxt is None:
            return False
        self._pending.extend(tuple(x) for x in nxt.tolist())
        return True

    def _projection(self) -> tuple[list[int], list[int]]:
        frac = self.estimator.fraction
        bs = self.alloc.block_size
        cur, rem = [], []
        for i in self._running:
            r = self.rows[i]
            total_own = r.prompt_len - r.own_start + len(r.generated)
            cur.append(-(-total_own // bs) * bs)
            rem.append(max(int(np.ceil(r.req.max_tokens * frac)) - len(r.generated), 0))
        return cur, rem

    def _prefix_tokens(self) -> int:
        bs = self.alloc.block_size
        return sum(len(s.blocks) * bs for s in self.prefix_seg.values())

    def next_step(self) -> list[Work]:
        """The next step's work; empty when the job is finished."""
        self.steps += 1
        works = self._works = []
        for i in list(self._running):  # decodes first: one token each
            r = self.rows[i]
            if r.running and r.generated and r.computed == r.prompt_len - r.own_start + len(r.generated) - 1:
                works.append(self._decode_work(i, r))
        budget = self.step_tokens
        cur, rem = self._projection()
        frac = self.estimator.fraction
        bs = self.alloc.block_size
        while budget > 0:
            if self._requeue:
                i = self._requeue[0]
                r = self.rows[i]
                own = r.prompt_len - r.own_start + len(r.generated)
                add = -(-own // bs) * bs
                left = max(int(np.ceil(r.req.max_tokens * frac)) - len(r.generated), 1)
                if not fits(np.array(cur + [add]), np.array(rem + [left]), self._prefix_tokens(), self.budget, bs):
                    break
                self._requeue.popleft()
                cur.append(add), rem.append(left)
                self._admit(i)
                tokens = list(r.req.prompt_ids[r.own_start :]) + r.generated
                works.append(self._prefill_work(i, r, tokens, r.own_start, sample=True))
                budget -= len(tokens)
                continue
            if not self._fill_pending():
                break
            kind, ident, start, end = self._pending[0]
            if kind == PREFIX:
                add_prefix = -(-(end - start) // bs) * bs
                if not fits(np.array(cur), np.array(rem), self._prefix_tokens() + add_prefix, self.budget, bs):
                    if not works:
                        raise OutOfBlocks(f"the KV budget ({self.budget} tokens) cannot hold shared prefix {ident}")
                    break
                self._pending.popleft()
                works.append(self._prefix_work(ident, start, end))
                budget -= end - start
                continue
            r = self.rows[ident]
            if not r.running:
                own = r.prompt_len - r.own_start
                add = -(-own // bs) * bs
                left = max(int(np.ceil(r.req.max_tokens * frac)), 1)
                if not fits(np.array(cur + [add]), np.array(rem + [left]), self._prefix_tokens(), self.budget, bs):
                    if not works and not self._running:
                        raise OutOfBlocks(f"row {r.req.index} needs more KV than the budget of {self.budget} tokens")
                    break
                cur.append(add), rem.append(left)
                self._admit(ident)
            self._pending.popleft()
            tokens = list(r.req.prompt_ids[start:end])
            works.append(self._prefill_work(ident, r, tokens, start, sample=end == r.prompt_len))
            budget -= end - start
        return works

    def _admit(self, i: int) -> None:
        r = self.rows[i]
        r.running = True
        self._running[i] = None
        r.order = self._admitted
        self._admitted += 1

    def _context(self, r: _Row) -> list[tuple[Segment, int]]:
        return [(self.prefix_seg[p], self.prefix_seg[p].length) for p in r.chain] + [(r.own, r.own.length)]

    def _prefill_work(self, i: int, r: _Row, tokens: list[int], start: int, sample: bool) -> Work:
        slots = self._reserve(r.own, len(tokens), protect=i)
        r.computed += len(tokens)
        return Work(i, tokens, start, self._context(r), slots, sample)

    def _decode_work(self, i: int, r: _Row) -> Work:
        slots = self._reserve(r.own, 1, protect=i)
        r.computed += 1
        pos = r.prompt_len + len(r.generated) - 1
        return Work(i, [r.generated[-1]], pos, self._context(r), slots, True)

    def _prefix_work(self, p: int, start: int, end: int) -> Work:
        pre = self.plan.prefixes
        seg = self.prefix_seg.get(p)
        if seg is None:
            seg = self.prefix_seg[p] = Segment()
        rep = self.rows[self.plan.trie.rep_row(int(pre.node[p]))]
        slots = self._reserve(seg, end - start, protect=None)
        chain = []
        q = int(pre.parent[p])
        while q >= 0:
            chain.append((self.prefix_seg[q], self.prefix_seg[q].length))
            q = int(pre.parent[q])
        return Work(-1 - p, list(rep.req.prompt_ids[start:end]), start, chain[::-1] + [(seg, seg.length)], slots,
                    False)

    def _reserve(self, seg: Segment, n: int, protect: int | None) -> list[int]:
        while True:
            try:
                return self.alloc.reserve(seg, n)
            except OutOfBlocks:
                if not self._preempt(protect):
                    raise

    def _preempt(self, protect: int | None) -> bool:
        """Free the newest decoding row's KV (not ``protect``); it is recomputed later."""
        victims = [i for i in self._running if self.rows[i].generated and i != protect]
        if not victims:
            return False
        i = max(victims, key=lambda k: self.rows[k].order)
        r = self.rows[i]
        self._works[:] = [w for w in self._works if w.key != i]  # drop its work in this step, if any
        self.alloc.release(r.own)
        r.own, r.computed, r.running = Segment(), 0, False
        self._running.pop(i, None)
        self._requeue.appendleft(i)
        self.preemptions += 1
        return True

    # -- after the step ------------------------------------------------------------------------------------

    def commit(self, works: list[Work], sampled: dict[int, int]) -> list[Completion]:
        """Record the sampled token of each sampling row; return the rows that finished."""
        finished = []
        for w in works:
            if w.key < 0 or w.key not in sampled:
                continue
            r = self.rows[w.key]
            if not r.running:  # preempted during this step
                continue
            r.generated.append(sampled[w.key])
            t = r.generated[-1]
            if t in self.stopper.eos_ids or len(r.generated) >= r.req.max_tokens or self.stopper.hit(r.generated):
                finished.append(self._finish(w.key))
        return finished

    def _finish(self, i: int) -> Completion:
        r = self.rows[i]
        r.running = False
        self._running.pop(i, None)
        self.alloc.release(r.own)
        for p in r.chain:
            self.prefix_refs[p] -= 1
            if self.prefix_refs[p] == 0:
                self.alloc.release(self.prefix_seg.pop(p))
        self.estimator.observe(r.req.max_tokens, len(r.generated))
        return self.stopper.finish(r.req.index, r.generated, r.req.max_tokens)
