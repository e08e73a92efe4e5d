"""Admission: which piece of work a step starts next, if the KV budget admits it (part of the scheduler,
``engine.scheduler``, kept apart: the policy of what may start, not the bookkeeping of what runs).

Work comes in plan order (the plan's packs: shared prefixes before their members), after rows preempted
earlier (recomputed first). A piece starts while the projected future peak KV of the running rows (their KV
now plus the output estimator's guess of their growth) and the live shared prefixes still fits the budget
(``plan.budget.fits``). A shared prefix evicted while its members waited is recomputed before them. When
nothing fits and nothing running could free memory, idle shared prefixes are evicted; work that does not fit
even alone fails with an error naming the budget, and the job goes on.

``Admission`` is the scheduler's base class: it reads the scheduler's state (``rows``, ``kv``, ``estimator``,
the pending packs, the running and computing work) and starts work through the scheduler's ``_start_row``
and ``_start_prefix``.
"""

from __future__ import annotations

from collections.abc import Iterable

from batchrun.engine.step import PrefixKey, WorkKey
from batchrun.engine.work import RowState
from batchrun.plan.budget import round_up
from batchrun.plan.pack import PREFIX


class Admission:
    """The scheduler's admission of new work (see the module's docstring)."""

    def _next_item(self) -> tuple | None:
        """The first pending pack item that still means work (later chunks of started work are dropped)."""
        while self._fill_pending():
            kind, ident, _, _ = self._pending[0]
            stale = (ident in self._started_prefixes or ident in self.kv.failed) if kind == PREFIX \
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

    def _admit_next(self) -> WorkKey | None:
        """Start the next piece of work if the KV budget admits it; its key, or None."""
        while True:
            if self._requeue:
                i = self._requeue[0]
                r = self.rows[i]
                missing = self._missing_prefix(r.chain)
                if missing is not None:  # its shared prefix was evicted meanwhile: recompute it first
                    if self._fits_prefix(missing):
                        return self._start_prefix(missing)
                    if self._busy() or self._evict_idle(set(r.chain)):
                        return None
                elif self._fits_row(r):
                    self._requeue.popleft()
                    if r.inflight:
                        self._recomputing.add(i)
                    return self._start_row(i, list(r.req.prompt_ids[r.own_start :]) + r.generated + r.inflight)
                elif self._busy():
                    return None  # wait for memory
                elif self._evict_idle(set(r.chain)):
                    continue
                self._requeue.popleft()  # alone it no longer fits: it has outgrown the budget
                self._fail(i, self._outgrew_message(r))
                continue
            item = self._next_item()
            if item is None:
                return None
            kind, ident, _, _ = item
            if kind == PREFIX:
                if self._parent[ident] in self.kv.failed:  # nested in a prefix that could not fit
                    self._pending.popleft()
                    self.kv.fail(ident)
                    continue
                chain = self._ancestry(ident)
                target = self._missing_prefix(chain[:-1])  # an enclosing prefix was evicted: recompute it first
                fresh = target is None
                target = ident if fresh else target
            else:
                r = self.rows[ident]
                if any(p in self.kv.failed for p in r.chain):
                    self._pending.popleft()
                    self._fail(ident, "its shared prefix does not fit the KV budget")
                    continue
                chain = r.chain
                target = self._missing_prefix(chain)  # evicted while its members waited: recompute it first
                fresh = False
            if target is not None:
                if not self._fits_prefix(target):
                    if self._blocked(keep=set(chain)):
                        continue
                    return None
                if fresh:
                    self._pending.popleft()
                return self._start_prefix(target)
            if not self._fits_row(r):
                if self._blocked(keep=set(chain)):
                    continue
                return None
            self._pending.popleft()
            return self._start_row(ident, list(r.req.prompt_ids[r.own_start :]))

    def _busy(self) -> bool:
        """Is anything running (or done this step) that will free memory later?"""
        return bool(self._running or self._computing or self._failed or self._works)

    def _blocked(self, keep: set[int]) -> bool:
        """The next piece of work does not fit. Wait (False), unless nothing runs that could free memory:
        then shared prefixes held for waiting rows are evicted (recomputed when needed), or, with none left,
        the work fails; either way the caller tries again (True)."""
        if self._busy():
            return False  # wait: this step's work (and failed rows' prefixes) free up after the step
        if self._evict_idle(keep):
            return True
        kind, ident, _, _ = self._pending.popleft()
        if kind == PREFIX:
            self.kv.fail(ident)
        else:
            r = self.rows[ident]
            need = r.own_tokens + r.req.max_tokens
            self._fail(ident, f"needs about {need} KV tokens beyond its shared prefixes; the KV budget is "
                              f"{self.kv.budget} (engine.kv_budget_tokens)")
        return True

    def _missing_prefix(self, chain: list[int]) -> int | None:
        """The outermost shared prefix of ``chain`` whose KV is not held (evicted), if any."""
        return next((p for p in chain if not self.kv.holds(p)), None)

    def _evict_idle(self, keep: Iterable[int]) -> bool:
        """Evict shared prefixes that no running row, no prefix being computed, no work of this step and
        nothing in ``keep`` uses; True if any was freed."""
        in_use = set(keep)
        for i in self._running:
            in_use.update(self.rows[i].chain)
        for key in [*self._computing, *(w.key for w in self._works)]:  # (a prefix written in this step stays)
            if isinstance(key, PrefixKey):
                in_use.update(self._ancestry(key.prefix))
        return self.kv.evict(in_use)

    def _projection(self) -> tuple[list[int], list[int]]:
        """Each running row's KV now (whole blocks) and its estimated growth (computed once per step, then
        kept up to date as rows start; a dropped row resets it)."""
        if self._proj is None:
            bs, est = self.kv.block_size, self.estimator
            rows = [self.rows[i] for i in self._running]
            self._proj = ([round_up(r.own_tokens, bs) for r in rows],
                          [est.remaining(r.req.max_tokens, r.output_len) for r in rows])
        return self._proj

    def _fits_row(self, r: RowState) -> bool:
        cur, rem = self._projection()
        left = max(self.estimator.remaining(r.req.max_tokens, r.output_len), 1)
        return self.kv.fits(cur + [round_up(r.own_tokens, self.kv.block_size)], rem + [left])

    def _fits_prefix(self, p: int) -> bool:
        cur, rem = self._projection()
        return self.kv.fits(cur, rem, extra_prefix=p)
