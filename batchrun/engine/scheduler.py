"""The scheduler: decides each step's work from the plan (admission and order). Never touches tensors, never
detokenizes; the KV manager (``engine.kv``) owns the memory.

A step is one forward pass over packed sequences:
1. one token for every row that is decoding;
2. the next tokens of work already started (a shared prefix or a row's prompt longer than what fitted in
   earlier steps: chunked prefill, SARATHI-style), first come first served;
3. new work in plan order — shared prefixes before their members — admitted while the projected future
   peak KV of the running set (``plan.budget.fits``, with the output estimator's guesses) plus the live
   shared prefixes fits the budget (``engine.admission``).
``next_step`` returns the step as a plain ``Step``; the runner computes it; ``commit`` records each sampled
token and reports it, ending rows at EOS or ``max_tokens``; the engine ends rows on stop strings through
``finish``. ``commit`` is ``launched`` then ``resolve``, and an engine may call them apart, to plan the next
step while the device still computes this one: after ``launched`` each drawn token is a placeholder, which
the next step feeds to the row's decode (the runner fills it in on the device); ``resolve`` then puts in
the real tokens. A row that ended at EOS in the step being resolved was already given one more decode in
the next step, and that token is dropped.

A finished row's KV is freed, and a shared prefix's when its last member lets go. If real outputs outgrow
the estimates and the pool runs dry, the newest decoding row is preempted: its KV is freed and it is
recomputed later from its prompt and the tokens it already produced. A row that cannot fit the budget even
alone fails with an error instead of stopping the job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from batchrun.engine.admission import Admission
from batchrun.engine.blocks import Segment
from batchrun.engine.kv import KVManager
from batchrun.engine.requests import Request
from batchrun.engine.step import KVLevel, PrefixKey, RowKey, SeqWork, Step, WorkKey, placeholder
from batchrun.engine.work import Pending, RowState
from batchrun.plan.budget import round_up
from batchrun.plan.order import OutputEstimator
from batchrun.plan.plan import Plan


class TokenEvent(NamedTuple):
    """A token a row just got; ``ended`` is "eos" or "length" when that token ends the row. (A named tuple:
    one is made per row and step.)"""

    key: RowKey
    token: int
    ended: str | None = None


class Scheduler(Admission):
    def __init__(self, plan: Plan, requests: Sequence[Request], kv: KVManager, step_tokens: int,
                 eos_ids: Iterable[int] = (), initial_estimate: float = 1.0):
        self.plan = plan
        self.kv = kv
        self.step_tokens = step_tokens
        self.eos_ids = frozenset(eos_ids)
        pre = plan.prefixes
        self._parent = pre.parent.tolist()
        self._start, self._end = pre.start.tolist(), pre.end.tolist()
        self.rows = [RowState(r, int(s), self._ancestry(int(p)), RowKey(i))
                     for i, (r, s, p) in enumerate(zip(requests, pre.row_start, pre.row_prefix))]
        self.estimator = OutputEstimator(np.array([r.max_tokens for r in requests], dtype=np.int64),
                                         initial_fraction=initial_estimate)
        self._packs = plan.packs()
        self._pending: deque = deque()
        self._started_prefixes: set[int] = set()  # (an evicted prefix is recomputed for its members, not here)
        self._computing: dict[WorkKey, Pending] = {}  # started, unfinished prefill, in start order
        self._requeue: deque[int] = deque()
        self._recomputing: set[int] = set()  # readmitted rows whose tokens to compute hold placeholders
        self._running: dict[int, None] = {}  # rows holding KV, in admission order
        self._admitted = 0
        self._works: list[SeqWork] = []
        # Per step: the running rows' KV projection (kept up to date as rows start) and the KV level of each
        # shared prefix (kept until the prefix grows): both are read for every admission and every row.
        self._proj: tuple[list[int], list[int]] | None = None
        self._prefix_levels: dict[int, KVLevel] = {}
        self._chain_levels: dict[int, list[KVLevel]] = {}  # innermost prefix -> its chain's levels (per step)
        self._failed: list[tuple[int, str]] = []
        self.preemptions = 0
        self.steps = 0

    def _ancestry(self, p: int) -> list[int]:
        """Shared prefix ``p`` and the prefixes enclosing it, outermost first ([] for p = -1)."""
        chain = []
        while p >= 0:
            chain.append(p)
            p = self._parent[p]
        return chain[::-1]

    def finished(self) -> bool:
        return not self._running and not self._computing and not self._requeue and not self._next_item()

    def generated(self, key: RowKey) -> list[int]:
        """The row's output tokens known so far."""
        return self.rows[key.row].generated

    # -- deciding a step -----------------------------------------------------------------------------------

    def next_step(self) -> Step:
        """The next step (empty when nothing can run: the job is finished, or only errors were left)."""
        self.steps += 1
        self._works = []
        self._proj = None
        self._prefix_levels, self._chain_levels = {}, {}
        computing = {k.row for k in self._computing if isinstance(k, RowKey)}
        rows = self.rows
        for i in list(self._running):
            r = rows[i]
            # (A row that drew its last token waits for it to be resolved, then ends.)
            if r.running and 0 < len(r.generated) + len(r.inflight) < r.req.max_tokens and i not in computing:
                self._decode(i, r)
        budget = self.step_tokens
        for key in list(self._computing):  # work already started, oldest first
            if budget <= 0:
                break
            budget -= self._advance(key, budget)
        while budget > 0:
            key = self._admit_next()
            if key is None:
                break
            budget -= self._advance(key, budget)
        return Step(self._works, self.kv.block_size)

    def take_errors(self) -> list[tuple[Request, str]]:
        """Rows that failed since the last call. Their shared prefixes are let go only now, after the step
        ran, so no block is reused within the step that still reads it."""
        failed, self._failed = self._failed, []
        for i, _ in failed:
            self._let_go_of_prefixes(self.rows[i])
        return [(self.rows[i].req, message) for i, message in failed]

    def _start_row(self, i: int, tokens: list[int]) -> RowKey:
        r = self.rows[i]
        if self._proj is not None:
            self._proj[0].append(round_up(r.own_tokens, self.kv.block_size))
            self._proj[1].append(self.estimator.remaining(r.req.max_tokens, r.output_len))
        r.started = r.running = True
        r.order = self._admitted
        self._admitted += 1
        self._running[i] = None
        key = RowKey(i)
        self._computing[key] = Pending(tokens, r.own_start)
        return key

    def _start_prefix(self, p: int) -> PrefixKey:
        start, end = self._start[p], self._end[p]
        rep = self.rows[self.plan.trie.rep_row(int(self.plan.prefixes.node[p]))]
        self._started_prefixes.add(p)
        self._forget_level(p)
        self.kv.share(p)
        key = PrefixKey(p)
        self._computing[key] = Pending(list(rep.req.prompt_ids[start:end]), start)
        return key

    def _advance(self, key: WorkKey, budget: int) -> int:
        """Compute up to ``budget`` more tokens of started work; returns how many."""
        job = self._computing[key]
        n = min(len(job.tokens) - job.done, budget)
        tokens = job.tokens[job.done : job.done + n]
        pos = job.start_pos + job.done
        job.done += n
        last = job.done == len(job.tokens)
        if last:
            del self._computing[key]
        if isinstance(key, PrefixKey):
            p = key.prefix
            seg = self.kv.segment(p)
            if seg is None:  # every member failed or finished meanwhile: nothing needs it any more
                return 0
            chain = self._ancestry(p)
            slots = self._reserve(seg, n, protect=None, keep=chain)
            self._forget_level(p)
            if slots is None:  # the prefix cannot fit even alone: its members fail as they come
                self.kv.fail(p)
                self._computing.pop(key, None)
                return n
            levels = [self._level(q) for q in chain[:-1]] + [KVLevel(key, seg.blocks, seg.length)]
            self._works.append(SeqWork(key, tokens, pos, levels, slots, False))
        else:
            r = self.rows[key.row]
            slots = self._reserve(r.own, n, protect=key.row, keep=r.chain)
            if slots is None:
                self._outgrown(key.row)
                return n
            self._works.append(SeqWork(key, tokens, pos, self._levels(r), slots, last))
        return n

    def _level(self, p: int) -> KVLevel:
        level = self._prefix_levels.get(p)
        if level is None:
            seg = self.kv.segment(p)
            level = self._prefix_levels[p] = KVLevel(PrefixKey(p), seg.blocks, seg.length)
        return level

    def _forget_level(self, p: int) -> None:
        """Shared prefix ``p`` grows in this step: later work sees its new length."""
        if self._prefix_levels.pop(p, None) is not None:
            self._chain_levels = {}

    def _levels(self, r: RowState) -> list[KVLevel]:
        # A snapshot by length: a later chunk of the same row may grow its segment within this step.
        own = KVLevel(r.key, r.own.blocks, r.own.length)
        if not r.chain:
            return [own]
        shared = self._chain_levels.get(r.chain[-1])
        if shared is None:
            shared = self._chain_levels[r.chain[-1]] = [self._level(p) for p in r.chain]
        return [*shared, own]

    def _decode(self, i: int, r: RowState) -> None:
        # (Once per decoding row and step: kept cheap.)
        seg, bs = r.own, self.kv.block_size
        at = seg.length % bs
        if at:  # room in its last block
            slots = [seg.blocks[-1] * bs + at]
            seg.length += 1
        else:
            slots = self._reserve(seg, 1, protect=i, keep=r.chain)
            if slots is None:
                self._outgrown(i)
                return
        inflight = r.inflight
        pos = len(r.req.prompt_ids) + len(r.generated) + len(inflight) - 1
        last = inflight[-1] if inflight else r.generated[-1]
        self._works.append(SeqWork(r.key, [last], pos, self._levels(r), slots, True, True))

    def _reserve(self, seg: Segment, n: int, protect: int | None, keep: Iterable[int]) -> list[int] | None:
        """Slots for ``n`` more tokens of ``seg``. If the pool is dry: preempt another row, else evict shared
        prefixes nobody running needs (not ``keep``). None if even that cannot make room."""
        while True:
            slots = self.kv.allocate(seg, n)
            if slots is not None:
                return slots
            if not self._preempt(protect) and not self._evict_idle(keep):
                return None

    def _drop(self, i: int) -> RowState:
        """Row ``i`` stops holding KV; its work in this step, if any, is dropped."""
        r = self.rows[i]
        key = RowKey(i)
        self._works[:] = [w for w in self._works if w.key != key]
        self._computing.pop(key, None)
        self._proj = None
        self.kv.release_row(r.own)
        r.own, r.running = Segment(), False
        self._running.pop(i, None)
        return r

    def _preempt(self, protect: int | None) -> bool:
        """Free the KV of the newest running row other than ``protect`` (decoding rows first); the row is
        recomputed later from its prompt and what it generated."""
        victims = [i for i in self._running if i != protect]
        if not victims:
            return False
        i = max(victims, key=lambda k: (RowKey(k) not in self._computing, self.rows[k].order))
        self._drop(i)
        self._requeue.appendleft(i)
        self.preemptions += 1
        return True

    def _outgrown(self, i: int) -> None:
        """Row ``i`` alone needs more KV than the pool holds: it fails, the job goes on."""
        self._fail(i, self._outgrew_message(self._drop(i)))

    def _outgrew_message(self, r: RowState) -> str:
        return (f"outgrew the KV budget of {self.kv.budget} tokens after {len(r.generated)} output tokens "
                "(engine.kv_budget_tokens)")

    # -- after the step ------------------------------------------------------------------------------------

    def commit(self, step: Step, tokens: Sequence[int]) -> list[TokenEvent]:
        """Record the token drawn for each of ``step.sample_keys``; a row ends at EOS or ``max_tokens``."""
        self.launched(step)
        return self.resolve(step, tokens)

    def launched(self, step: Step) -> None:
        """``step`` is on its way: each row it draws for has one more token, not known yet (a placeholder)."""
        rows = self.rows
        for j, key in enumerate(step.sample_keys):
            r = rows[key.row]
            if r.running:
                r.inflight.append(placeholder(j))

    def resolve(self, step: Step, tokens: Sequence[int]) -> list[TokenEvent]:
        """The tokens ``step`` drew (for each of its ``sample_keys``) are known: record and report them."""
        events = []
        rows, eos, recomputing = self.rows, self.eos_ids, self._recomputing  # (once per row and step: cheap)
        for j, (key, t) in enumerate(zip(step.sample_keys, tokens)):
            r = rows[key.row]
            ph, inflight = placeholder(j), r.inflight
            if r.done or not inflight or inflight[0] != ph:
                continue  # (it ended meanwhile: at EOS found in the step before, or it failed)
            del inflight[0]
            r.generated.append(t)
            if recomputing and key.row in recomputing:  # readmitted after a preemption: its tokens hold the placeholder
                job = self._computing.get(key)
                if job is not None:
                    job.tokens = [t if x == ph else x for x in job.tokens]
                if not r.inflight:
                    self._recomputing.discard(key.row)
            ended = "eos" if t in eos else "length" if len(r.generated) >= r.req.max_tokens else None
            events.append(TokenEvent(key, t, ended))
        return events

    def force(self, key: RowKey, tokens: Sequence[int]) -> str | None:
        """Append tokens a row's constraint forces after the token it just drew: the next step computes that
        token and these together, as a chunk, and draws from its end. Returns why the row ends, if it does
        ("eos", "length"), as ``commit`` would have."""
        r = self.rows[key.row]
        tokens = list(tokens[: r.req.max_tokens - len(r.generated)])
        eos = next((j for j, t in enumerate(tokens) if t in self.eos_ids), None)
        if eos is not None:
            r.generated.extend(tokens[: eos + 1])
            return "eos"
        r.generated.extend(tokens)
        if len(r.generated) >= r.req.max_tokens:
            return "length"
        chunk = r.generated[-len(tokens) - 1 :]
        self._computing[key] = Pending(chunk, len(r.req.prompt_ids) + len(r.generated) - len(chunk))
        return None

    def finish(self, key: RowKey) -> RowState:
        """End a running row (its EOS, its limit, or a stop string the engine found): free its KV."""
        r = self.rows[key.row]
        r.running, r.done = False, True
        r.inflight.clear()  # (a token drawn after its end)
        self._computing.pop(key, None)  # (forced tokens not computed yet)
        self._running.pop(key.row, None)
        if key.row in self._requeue:  # (preempted while its last token was on its way)
            self._requeue.remove(key.row)
        self.kv.release_row(r.own)
        self._let_go_of_prefixes(r)
        self.estimator.observe(r.req.max_tokens, len(r.generated))
        return r

    def _let_go_of_prefixes(self, r: RowState) -> None:
        for p in self.kv.release_member(r.chain):
            self._computing.pop(PrefixKey(p), None)

    def _fail(self, i: int, message: str) -> None:
        self.rows[i].started = self.rows[i].done = True
        self.rows[i].inflight.clear()
        self._failed.append((i, message))
