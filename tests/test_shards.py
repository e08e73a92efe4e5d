"""Sharding a plan along the prefix trie (``plan/shards.py``): a shared prefix stays in one shard unless its
rows cost more than a fair share, costs add up exactly, the balance, duplicated prefill, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.plan.shards import shard_plan
from batchrun.tokens import TokenTable


def _plan(rows, max_tokens=4):
    return build_plan(TokenTable.from_lists(rows), np.full(len(rows), max_tokens), PlanConfig())


def _groups(prefix_len: int, groups: int, per_group: int, own: int = 8):
    rows = []
    for g in range(groups):
        head = [1000 + g] + [g + 1] * (prefix_len - 1)
        for i in range(per_group):
            rows.append(head + [5000 + 97 * g + i + j for j in range(own)])
    return rows


def test_each_shared_prefix_stays_in_one_shard_and_costs_add_up():
    plan = _plan(_groups(prefix_len=64, groups=8, per_group=6))
    shards = shard_plan(plan, workers=2, per_worker=4)
    assert shards.count == 8 and shards.duplicated_prefill == 0
    for g in range(8):
        assert len(set(shards.row_shard[g * 6:(g + 1) * 6].tolist())) == 1
    p = plan.prefixes
    own = plan.tokens.lengths - p.row_start + plan.est_output
    assert shards.cost.sum() == own.sum() + p.tokens.sum()  # every prefix once
    assert list(shards.cost) == sorted(shards.cost, reverse=True) and shards.balance == pytest.approx(1.0)
    assert sorted(np.concatenate([shards.rows(s) for s in range(shards.count)]).tolist()) == list(range(48))


def test_a_prefix_bigger_than_a_fair_share_is_cut_and_its_prefill_counted_again():
    plan = _plan(_groups(prefix_len=200, groups=1, per_group=40), max_tokens=32)
    shards = shard_plan(plan, workers=2, per_worker=2)
    pieces = shards.count  # (a fair share counts the prefill that the cuts compute again: 3 shards, not 4)
    assert pieces == 3 and shards.duplicated_prefill == (pieces - 1) * int(plan.prefixes.tokens.sum())
    assert [len(shards.rows(s)) for s in range(pieces)] == [14, 14, 12]
    assert shards.balance < 1.1
    p = plan.prefixes
    own = plan.tokens.lengths - p.row_start + plan.est_output
    assert shards.cost.sum() == own.sum() + p.tokens.sum() + shards.duplicated_prefill


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(1, 30), st.integers(1, 40)), min_size=1, max_size=12),
       st.integers(1, 6))
def test_every_row_in_one_shard_and_a_prefix_cut_only_over_a_fair_share(groups, workers):
    """(prefix length, rows, own tokens) per group: rows of a group share its prefix (none when 0)."""
    rows, members = [], []
    for g, (prefix, count, own_len) in enumerate(groups):
        head = [1000 + g] * prefix
        members.append(list(range(len(rows), len(rows) + count)))
        rows += [head + [20000 + 1000 * g + 40 * i + j for j in range(own_len)] for i in range(count)]
    plan = _plan(rows)
    shards = shard_plan(plan, workers)
    assert sorted(np.concatenate([shards.rows(s) for s in range(shards.count)]).tolist()) == list(range(len(rows)))
    p = plan.prefixes
    own = plan.tokens.lengths - p.row_start + plan.est_output
    fair = (own.sum() + p.tokens.sum()) / min(len(rows), workers * 8)  # (the smallest fair share it may try)
    for prefix in range(len(p.parent)):
        if p.parent[prefix] >= 0:
            continue
        under = np.flatnonzero(_under(p, prefix))
        cost = own[under].sum() + p.tokens[_descendants(p, prefix)].sum()
        if len(set(shards.row_shard[under].tolist())) > 1:
            assert cost > fair, "a prefix within a fair share was split"
    assert shards.cost.sum() == own.sum() + p.tokens.sum() + shards.duplicated_prefill


def _under(p, prefix: int) -> np.ndarray:
    """Rows whose prefix chain passes through ``prefix``."""
    out = np.zeros(len(p.row_prefix), dtype=bool)
    for r, q in enumerate(p.row_prefix.tolist()):
        while q >= 0:
            if q == prefix:
                out[r] = True
                break
            q = int(p.parent[q])
    return out


def _descendants(p, prefix: int) -> list[int]:
    out = [prefix]
    for q in range(len(p.parent)):
        a = q
        while a >= 0 and a != prefix:
            a = int(p.parent[a])
        if a == prefix and q != prefix:
            out.append(q)
    return out


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_the_four_benchmark_workloads_balance_within_10_percent_at_scale_1(workers):
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import workloads

    for name in workloads.NAMES:
        w = workloads.make(name, scale=1.0, seed=0)
        shards = shard_plan(build_plan(w.tokens, w.max_tokens, PlanConfig()), workers)
        assert shards.balance <= 1.10, (name, shards.report())
        assert shards.count >= workers


def test_rows_without_a_prefix_balance_and_sharding_repeats_exactly():
    rng = np.random.default_rng(3)
    rows = [rng.integers(10, 30000, size=int(rng.integers(5, 80))).tolist() for _ in range(50)]
    plan = _plan(rows)
    a, b = shard_plan(plan, workers=3), shard_plan(plan, workers=3)
    assert np.array_equal(a.row_shard, b.row_shard) and a.count == 6 and a.duplicated_prefill == 0  # (2 a worker)
    assert a.balance < 1.5
    assert shard_plan(plan, workers=100).count == 50  # at most one shard a row
    with pytest.raises(ValueError, match="at least 1"):
        shard_plan(plan, workers=0)


def test_plan_with_workers_shows_the_shards(tmp_path, tiny_model_dir, reviews_parquet):
    import json

    from click.testing import CliRunner

    from batchrun.cli import cli
    from helpers import write_job

    job = write_job(tmp_path, f"name: s\nmodel: {{path: {tiny_model_dir}}}\n"
                              f"input: {{path: {reviews_parquet}, id: id}}\n"
                              "prompt: {template: 'A long shared instruction for every review. Review: {{ text }}'}\n"
                              "sampling: {max_tokens: 4}\noutput: {path: out}\nengine: {device: cpu}\n")
    done = CliRunner().invoke(cli, ["plan", str(job), "--workers", "2", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output.strip().splitlines()[-1])["shards"]
    assert report["shards"] >= 2 and len(report["cost"]) == report["shards"] and report["balance"] >= 1.0
    assert "shards" in done.output and "for 2 worker(s)" in done.output
    plain = json.loads(CliRunner().invoke(cli, ["plan", str(job), "--json"]).output.strip().splitlines()[-1])
    assert plain["shards"] is None
    devices = CliRunner().invoke(cli, ["plan", str(job), "--json", "--set", "engine.devices=[cpu, cpu, cpu]",
                                       "--set", "engine.device=auto"])
    assert json.loads(devices.output.strip().splitlines()[-1])["shards"]["shards"] >= 3, devices.output
