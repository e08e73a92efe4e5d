"""Sharding a plan along the prefix trie (``plan/shards.py``): a shared prefix stays in one shard unless its
rows cost more than a fair share, costs add up exactly, the balance, duplicated prefill, determinism."""

from __future__ import annotations

import numpy as np
import pytest

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
    plan = _plan(_groups(prefix_len=200, groups=1, per_group=40))
    shards = shard_plan(plan, workers=2, per_worker=2)
    pieces = shards.count  # (pieces of about a fair share of the rows' own cost: 3 here, each with the prefix)
    assert pieces == 3 and shards.duplicated_prefill == (pieces - 1) * int(plan.prefixes.tokens.sum())
    assert [len(shards.rows(s)) for s in range(pieces)] == [15, 15, 10]
    assert shards.balance < 1.2
    p = plan.prefixes
    own = plan.tokens.lengths - p.row_start + plan.est_output
    assert shards.cost.sum() == own.sum() + p.tokens.sum() + shards.duplicated_prefill


def test_rows_without_a_prefix_balance_and_sharding_repeats_exactly():
    rng = np.random.default_rng(3)
    rows = [rng.integers(10, 30000, size=int(rng.integers(5, 80))).tolist() for _ in range(50)]
    plan = _plan(rows)
    a, b = shard_plan(plan, workers=3), shard_plan(plan, workers=3)
    assert np.array_equal(a.row_shard, b.row_shard) and a.count == 12 and a.duplicated_prefill == 0
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
