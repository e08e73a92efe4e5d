"""The Plan: everything the engine needs to run a job in a good order, built once up front.

``build_plan`` takes the job's token table and per-row ``max_tokens`` and returns a ``Plan``: the trie,
the shared prefixes (multi-level), the row order, output estimates, each prefix's lifetime, and a lazy
stream of prefill packs. ``Plan.stats`` summarises it for ``batchrun plan``; ``simulate`` projects steps
and KV peak. Everything here is numpy arrays, so a million rows are a few arrays, not a million objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from batchrun.plan.groups import DEFAULT_OVERHEAD_TOKENS, PrefixGroups, choose_prefixes
from batchrun.plan.order import order_rows
from batchrun.plan.pack import packs, work_items
from batchrun.plan.trie import Trie, build_trie
from batchrun.tokens import TokenTable


@dataclass(frozen=True)
class PlanConfig:
    step_tokens: int = 8192  # prefill tokens per step (pack capacity)
    block_size: int = 16  # KV block size, tokens
    overhead_tokens: int = DEFAULT_OVERHEAD_TOKENS  # sharing a prefix must save more prefill than this
    window_packs: int = 8  # best-fit decreasing looks this many packs ahead
    longest_first: bool = True  # siblings: the longest estimated output first (False: BatchLLM's ratio alone)


@dataclass(frozen=True)
class Plan:
    tokens: TokenTable
    max_tokens: np.ndarray  # int64 [rows]
    trie: Trie
    prefixes: PrefixGroups
    order: np.ndarray  # int64 [rows]: rows in execution order
    est_output: np.ndarray  # int64 [rows]: output estimate used for ordering
    position: np.ndarray  # int64 [rows]: each row's index in ``order``
    prefix_first: np.ndarray  # int64 [P]: position of the prefix's first member (its KV is made then)
    prefix_last: np.ndarray  # int64 [P]: position of its last member (its KV can go once that row ends)
    config: PlanConfig = field(default_factory=PlanConfig)

    @property
    def num_rows(self) -> int:
        return len(self.order)

    def packs(self) -> Iterator[np.ndarray]:
        """Prefill packs in execution order (see ``batchrun.plan.pack``), produced lazily."""
        p = self.prefixes
        items = work_items(self.order, self.tokens.lengths, p.row_prefix, p.parent, p.start, p.end)
        return packs(items, self.config.step_tokens, self.config.window_packs)

    def prefill_tokens(self) -> int:
        """Prompt tokens the engine computes: each shared prefix once, each row's own tokens."""
        p = self.prefixes
        own = self.tokens.lengths - p.row_start
        return int(own.sum() + p.tokens.sum())

    def stats(self) -> dict:
        """Sizes and savings (exact), share degrees, packing efficiency (iterates the packs once)."""
        lengths = self.tokens.lengths
        prompt = int(lengths.sum())
        prefill = self.prefill_tokens()
        n_packs = packed = 0
        for pack in self.packs():
            n_packs += 1
            packed += int((pack[:, 3] - pack[:, 2]).sum())
        degrees = self.prefixes.share_degrees()
        return {
            "rows": self.num_rows,
            "prompt_tokens": prompt,
            "unique_tokens": self.trie.unique_tokens,
            "prefill_tokens": prefill,
            "saving_ratio": round(1 - prefill / prompt, 4) if prompt else 0.0,
            "max_output_tokens": int(self.max_tokens.sum()),
            "shared_prefixes": len(self.prefixes),
            "shared_prefix_tokens": int(self.prefixes.tokens.sum()),
            "prefix_levels": _levels(self.prefixes),
            "share_degree": _degree_summary(degrees),
            "packs": n_packs,
            "pack_capacity": self.config.step_tokens,
            "packing_efficiency": round(packed / (n_packs * self.config.step_tokens), 4) if n_packs else 1.0,
        }


def build_plan(tokens: TokenTable, max_tokens: np.ndarray, config: PlanConfig | None = None,
               est_output: np.ndarray | None = None) -> Plan:
    config = config or PlanConfig()
    max_tokens = np.asarray(max_tokens, dtype=np.int64)
    if len(max_tokens) != len(tokens):
        raise ValueError(f"max_tokens has {len(max_tokens)} rows, the token table {len(tokens)}")
    est = max_tokens if est_output is None else np.minimum(np.asarray(est_output, dtype=np.int64), max_tokens)
    trie = build_trie(tokens)
    prefixes = choose_prefixes(trie, config.overhead_tokens)
    order = order_rows(trie, est, config.longest_first)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    first, last = _lifetimes(prefixes, position)
    return Plan(tokens, max_tokens, trie, prefixes, order, est, position, first, last, config)


def _lifetimes(prefixes: PrefixGroups, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(prefixes)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    rows = np.nonzero(prefixes.row_prefix >= 0)[0]
    np.minimum.at(first, prefixes.row_prefix[rows], position[rows])
    np.maximum.at(last, prefixes.row_prefix[rows], position[rows])
    for p in range(n - 1, -1, -1):  # a prefix lives as long as any nested prefix's members
        q = prefixes.parent[p]
        if q >= 0:
            first[q] = min(first[q], first[p])
            last[q] = max(last[q], last[p])
    return first, last


def _levels(prefixes: PrefixGroups) -> int:
    level = np.zeros(len(prefixes), dtype=np.int64)
    for p in range(len(prefixes)):
        q = prefixes.parent[p]
        level[p] = level[q] + 1 if q >= 0 else 1
    return int(level.max()) if len(level) else 0


def _degree_summary(degrees: dict[int, int]) -> dict:
    if not degrees:
        return {}
    values = np.repeat(np.array(list(degrees.keys())), np.array(list(degrees.values())))
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max()),
            "histogram": {f"{lo}-{hi}": int(((values >= lo) & (values <= hi)).sum())
                          for lo, hi in ((2, 3), (4, 15), (16, 127), (128, 1023), (1024, 10**12))
                          if ((values >= lo) & (values <= hi)).any()}}
