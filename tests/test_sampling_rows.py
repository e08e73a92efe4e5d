"""Per-row sampling settings (temperature, top_p, top_k, seed and stop from columns) and n samples per row.

Engines: a request's own settings give exactly what a run with those settings for every row gives (greedy
rows equal the oracle), and per-request stop strings cut like the oracle's. Jobs (``api.submit``, a tiny
random model, fp32 on CPU): per-row values equal uniform jobs, bad values are row errors with exact messages,
wrong column types stop the job, and ``n`` samples give n rows per input row (``sample`` column), sample 0
equal to the n = 1 output, written whole and resumed without duplicates.
"""

from __future__ import annotations

import collections
import math
import shutil
from dataclasses import replace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batchrun import api
from batchrun.engine.batch import BatchEngine
from batchrun.engine.loader import load, load_tokenizer
from batchrun.engine.reference import ReferenceEngine
from batchrun.engine.requests import Completion, Request, SamplingParams, row_seed, sample_seed
from batchrun.engine.sampling import row_generator, sample_tensor
from batchrun.errors import InputDataError, SpecError
from batchrun.plan.plan import PlanConfig, build_plan
from batchrun.runtime.assemble import Samples
from batchrun.runtime.prepare import prepare
from batchrun.spec import EngineSpec, ModelSpec, validate_dict
from batchrun.tokens import TokenTable
from helpers import crash_after_first_batch, make_tiny_model

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Summarize: the kettle boils fast, the handle stays cool, and the lid never leaks. Verdict:",
    "Summarize: the charger broke after a week and support never replied. Verdict:",
    "Question: what is the capital of France?\nAnswer:",
    "1, 2, 3, 4,",
    "Hi",
]
GREEDY = SamplingParams()
HOT = SamplingParams(temperature=1.2, top_k=40, top_p=0.9)
WARM = SamplingParams(temperature=0.7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load(ModelSpec(path=model_dir, dtype="float32"), EngineSpec(device="cpu"))


def _requests(tok, max_tokens: int = 10, seed: int = 0) -> list[Request]:
    ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    return [Request(key=i, prompt_ids=p, max_tokens=max_tokens, seed=row_seed(seed, i)) for i, p in enumerate(ids)]


def _plan(reqs: list[Request]):
    return build_plan(TokenTable.from_lists(r.prompt_ids for r in reqs), np.array([r.max_tokens for r in reqs]),
                      PlanConfig(step_tokens=64, block_size=4))


def _run(loaded, kind: str, params: SamplingParams, reqs: list[Request]) -> dict:
    if kind == "batchrun":
        runs = BatchEngine(loaded, params, 100_000, 4, 64).run(reqs, _plan(reqs))
    else:
        runs = ReferenceEngine(loaded, params, batch_size=4).run(reqs)
    got = {c.key: c for batch in runs for c in batch}
    assert sorted(got, key=str) == sorted((r.key for r in reqs), key=str)
    return got


def _oracle(loaded, reqs: list[Request], params: SamplingParams) -> dict:
    """The reference engine, one prompt at a time."""
    return {r.key: _run(loaded, "reference", params, [r])[r.key] for r in reqs}


# ------------------------------------------------------------------------------------------------- engines


def test_sample_draws_each_row_as_if_alone():
    """A batch of rows with different settings: each row's token is what that row alone, with the same
    settings and a generator of the same seed, draws; greedy rows are the argmax."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = [GREEDY, HOT, WARM, HOT, GREEDY, SamplingParams(temperature=2.0, top_k=3)]
    gens = [None if p.greedy else row_generator(100 + i, "cpu") for i, p in enumerate(params)]
    got = [sample_tensor(logits, params, gens).tolist() for _ in range(5)]  # five steps: the generators advance
    for i, p in enumerate(params):
        gen = None if p.greedy else row_generator(100 + i, "cpu")
        alone = [int(sample_tensor(logits[i : i + 1], [p], [gen])[0]) for _ in range(5)]
        assert [g[i] for g in got] == alone, f"row {i}"
    assert [g[0] for g in got] == [int(logits[0].argmax())] * 5


@pytest.mark.parametrize("kind", ["batchrun", "reference"])
def test_per_request_settings_equal_a_run_with_those_settings_for_every_row(tiny, kind):
    reqs = _requests(tiny.tokenizer, seed=4)
    settings = {r.key: [GREEDY, HOT, WARM][r.key % 3] for r in reqs}
    mixed = _run(tiny, kind, SamplingParams(ignore_eos=True),
                 [replace(r, sampling=settings[r.key]) for r in reqs])
    for s in (GREEDY, HOT, WARM):
        uniform = _run(tiny, kind, replace(s, ignore_eos=True), reqs)
        for r in reqs:
            if settings[r.key] == s:
                assert mixed[r.key].token_ids == uniform[r.key].token_ids, f"row {r.key}"
    oracle = _oracle(tiny, reqs, SamplingParams(ignore_eos=True))
    for r in reqs:
        if settings[r.key] == GREEDY:
            assert mixed[r.key].token_ids == oracle[r.key].token_ids, f"row {r.key}"
    hot = [r.key for r in reqs if settings[r.key] == HOT]
    assert any(mixed[k].token_ids != oracle[k].token_ids for k in hot)  # (really sampled)


@pytest.mark.parametrize("kind", ["batchrun", "reference"])
def test_per_request_stop_strings_cut_like_the_oracle(tiny, kind):
    reqs = _requests(tiny.tokenizer, max_tokens=16)
    free = _oracle(tiny, reqs, SamplingParams(ignore_eos=True))
    stops = {r.key: (free[r.key].text[4:6],) if r.key % 2 == 0 else () for r in reqs}  # odd rows: none
    stopped = [replace(r, sampling=SamplingParams(stop=stops[r.key])) for r in reqs]
    got = _run(tiny, kind, SamplingParams(stop=("never in any output",), ignore_eos=True), stopped)
    for r in reqs:
        text = free[r.key].text
        want = _oracle(tiny, [r], SamplingParams(stop=stops[r.key], ignore_eos=True))[r.key]
        assert (got[r.key].token_ids, got[r.key].text, got[r.key].finish_reason) == (
            want.token_ids, want.text, want.finish_reason), f"row {r.key}"
        if stops[r.key]:
            assert (got[r.key].text, got[r.key].finish_reason) == (text[: text.find(stops[r.key][0])], "stop")
        else:
            assert (got[r.key].text, got[r.key].finish_reason) == (text, "length")


# ------------------------------------------------------------------------------------------- n samples


def _spec(model: str, data, out, sampling: dict, part_rows: int = 1000, **engine):
    return validate_dict({
        "name": "t", "model": {"path": model, "dtype": "float32"}, "input": {"path": str(data), "id": "id"},
        "prompt": {"template": "Review: {{ text }}\nSummary:", "chat": False},
        "sampling": {"max_tokens": 6, "ignore_eos": True, **sampling},
        "output": {"path": str(out), "part_rows": part_rows}, "engine": {"device": "cpu", **engine}})


def _data(tmp_path, **columns) -> str:
    texts = columns.pop("text", [
        "Great kettle, boils fast and the handle stays cool.", "Broke after a day; support never answered.",
        "It is a cable. It works.", "Fantastic sound, comfy fit, long battery life.",
        "Terrible support, never again.", "Arrived late but works fine."])
    path = tmp_path / f"in-{len(list(tmp_path.glob('in-*')))}.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts, **columns}), path)
    return str(path)


def _rows(out) -> list[dict]:
    rel = duckdb.sql(f"SELECT * FROM '{out}/*.parquet'")
    rows = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
    return sorted(rows, key=lambda r: (r["id"], r.get("sample", 0)))


def _submit(tmp_path, name: str, model: str, data, sampling: dict, **kw) -> tuple:
    result = api.submit(_spec(model, data, tmp_path / name, sampling, **kw))
    return result, _rows(tmp_path / name)


def test_n_samples_share_the_prompt_in_the_plan_and_equal_single_requests(tiny, model_dir, tmp_path):
    tok = load_tokenizer(ModelSpec(path=model_dir), model_dir)
    data = _data(tmp_path)
    one = prepare(_spec(model_dir, data, tmp_path / "o1", {"temperature": 1.0}), tok, 512)
    four = prepare(_spec(model_dir, data, tmp_path / "o4", {"temperature": 1.0, "n": 4}), tok, 512)
    rows = one.num_rows
    assert len(four.requests) == 4 * rows and sorted(r.key for r in four.requests) == [
        (i, k) for i in range(rows) for k in range(4)]
    p1, p4 = one.plan.prefill_tokens(), four.plan.prefill_tokens()
    assert p1 <= p4 <= p1 + 3 * rows  # the prompt once; each sample computes at most one token of its own
    assert four.plan.tokens.num_tokens == 4 * one.plan.tokens.num_tokens

    engine = BatchEngine(tiny, SamplingParams(temperature=1.0, ignore_eos=True), 100_000, 4, 64)
    got = {c.key: c for batch in engine.run(four.requests, four.plan) for c in batch}
    for r in four.requests:
        row, k = r.key
        assert r.seed == sample_seed(row_seed(0, one.ids[row]), k)
        alone = Request("alone", r.prompt_ids, r.max_tokens, seed=r.seed)
        assert got[r.key].token_ids == _run(tiny, "batchrun", engine.sampling, [alone])["alone"].token_ids
    assert all(len({tuple(got[i, k].token_ids) for k in range(4)}) > 1 for i in range(rows))

    greedy = prepare(_spec(model_dir, data, tmp_path / "g4", {"n": 4}), tok, 512)
    got = {c.key: c for batch in BatchEngine(tiny, SamplingParams(ignore_eos=True), 100_000, 4, 64).run(
        greedy.requests, greedy.plan) for c in batch}
    oracle = _oracle(tiny, [r for r in greedy.requests if r.key[1] == 0], SamplingParams(ignore_eos=True))
    for r in greedy.requests:
        assert got[r.key].token_ids == oracle[r.key[0], 0].token_ids, f"request {r.key}"


def test_samples_assembler_hands_back_a_row_when_its_last_sample_completes():
    asm = Samples(3, [5, 7])
    reqs = asm.requests(1, [1, 2, 3], 4, seed=11)
    assert [(r.key, r.seed) for r in reqs] == [((1, k), sample_seed(11, k)) for k in range(3)]
    assert reqs[0].seed == 11
    assert asm.fields[0].name == "sample" and asm.fields[0].type == pa.int32()
    done = [asm.add(Completion((1, k), [k], f"t{k}", "length")) for k in (2, 0)]
    assert done == [[], []]
    rows = asm.add(Completion((1, 1), [1], "t1", "length"))
    assert [(r.row, r.values["sample"], r.values["output"], r.values["prompt_tokens"]) for r in rows] == [
        (1, 0, "t0", 7), (1, 1, "t1", 7), (1, 2, "t2", 7)]
    failed = asm.failed(0, "boom")
    assert [(r.row, r.values["sample"], r.values["error"]) for r in failed] == [(0, k, "boom") for k in range(3)]


def test_n_samples_through_submit(tmp_path, model_dir):
    texts = ["Great kettle.", "Broke after a day.", None, "It is a cable.", "Fantastic sound, comfy fit."]
    data = _data(tmp_path, text=texts)
    single, rows1 = _submit(tmp_path, "one", model_dir, data, {"temperature": 1.0})
    result, rows = _submit(tmp_path, "three", model_dir, data, {"temperature": 1.0, "n": 3}, part_rows=2)
    assert (result.rows_ok, result.rows_error) == (12, 3)
    assert [(r["id"], r["sample"]) for r in rows] == [(f"r{i}", k) for i in range(5) for k in range(3)]
    schema = pq.read_schema(next((tmp_path / "three").glob("part-*.parquet")))
    assert schema.names == ["id", "text", "sample", "output", "prompt_tokens", "output_tokens", "finish_reason",
                            "error"] and schema.field("sample").type == pa.int32()
    assert "sample" not in rows1[0]  # n = 1: no sample column
    first = [{k: v for k, v in r.items() if k != "sample"} for r in rows if r["sample"] == 0]
    assert first == rows1  # sample 0 is the n = 1 output
    assert [r["error"] for r in rows if r["id"] == "r2"] == ["column 'text' is null"] * 3
    outputs = collections.defaultdict(set)
    for r in rows:
        outputs[r["id"]].add(r["output"])
    assert all(len(outputs[f"r{i}"]) > 1 for i in (0, 1, 3, 4))  # sampled: the samples differ
    for part in (tmp_path / "three").glob("part-*.parquet"):  # a part holds whole input rows
        counts = collections.Counter(pq.read_table(part, columns=["id"]).column("id").to_pylist())
        assert set(counts.values()) == {3}, part.name

    _, greedy = _submit(tmp_path, "greedy", model_dir, data, {"n": 2})
    for i in (0, 1, 3, 4):
        assert len({r["output"] for r in greedy if r["id"] == f"r{i}"}) == 1  # greedy: identical samples


def test_n_samples_resume_after_a_crash_duplicates_none(tmp_path, model_dir, monkeypatch):
    data = _data(tmp_path, text=["Great kettle.", "Broke after a day.", None, "It is a cable.", "So-so.", "Fine."])
    sampling = {"temperature": 1.0, "n": 3}
    engine = {"backend": "reference", "batch_size": 4}
    _, clean = _submit(tmp_path, "clean", model_dir, data, sampling, **engine)

    real_run = ReferenceEngine.run
    first = crash_after_first_batch(monkeypatch, ReferenceEngine)
    with pytest.raises(RuntimeError, match="simulated crash"):
        api.submit(_spec(model_dir, data, tmp_path / "out", sampling, part_rows=2, **engine))
    st = api.status(tmp_path / "out")
    # the error row's 3 rows and one row whose 3 samples were in the first batch of 4; the 4th is dropped
    assert len(first) == 4 and (st["state"], st["rows_committed"]) == ("incomplete", 6)
    monkeypatch.setattr(ReferenceEngine, "run", real_run)

    # A part holding only some of a row's samples (batchrun never writes one) is damage, not a row to skip.
    shutil.copytree(tmp_path / "out", tmp_path / "cut")
    part = next(p for p in sorted((tmp_path / "cut").glob("part-*.parquet"))
                if pq.read_table(p).column("error").null_count)
    pq.write_table(pq.read_table(part).slice(1), part)
    with pytest.raises(SpecError) as e:
        api.submit(_spec(model_dir, data, tmp_path / "cut", sampling, part_rows=2, **engine))
    assert e.value.problems == ["the parts hold some but not all 3 samples of 1 id(s)"]

    result = api.submit(_spec(model_dir, data, tmp_path / "out", sampling, part_rows=2, **engine))
    assert (result.rows_skipped, result.rows_ok + result.rows_error, result.rows_total) == (6, 12, 18)
    assert _rows(tmp_path / "out") == clean


# ------------------------------------------------------------------------------------------ per-row values


def test_per_row_sampling_columns_equal_uniform_jobs(tmp_path, model_dir):
    temps = [0.0, 0.8, 1.5, 0.8, 0.0, 1.5]
    top_p = [1.0, 0.9, 1.0, 0.9, 0.5, 1.0]
    top_k = [0, 0, 40, 0, 3, 40]
    data = _data(tmp_path, temp=temps, p=top_p, k=pa.array(top_k, type=pa.int32()))
    _, mixed = _submit(tmp_path, "mixed", model_dir, data, {"temperature": "temp", "top_p": "p", "top_k": "k"})
    uniform = {
        (0.0, 1.0, 0): _submit(tmp_path, "greedy", model_dir, data, {})[1],
        (0.8, 0.9, 0): _submit(tmp_path, "warm", model_dir, data, {"temperature": 0.8, "top_p": 0.9})[1],
        (1.5, 1.0, 40): _submit(tmp_path, "hot", model_dir, data, {"temperature": 1.5, "top_k": 40})[1],
    }
    for i, row in enumerate(mixed):
        key = (0.0, 1.0, 0) if temps[i] == 0 else (temps[i], top_p[i], top_k[i])  # greedy ignores top_p/top_k
        assert row["output"] == uniform[key][i]["output"] and row["error"] is None, f"row {i}"
    assert mixed[1]["output"] != uniform[0.0, 1.0, 0][1]["output"]  # (really sampled)


def test_a_seed_column_takes_the_place_of_the_job_seed(tmp_path, model_dir):
    seeds = [0, 5, 5, 0, 5, 0]
    data = _data(tmp_path, s=seeds)
    _, mixed = _submit(tmp_path, "mixed", model_dir, data, {"temperature": 1.0, "seed": "s"})
    by_seed = {s: _submit(tmp_path, f"seed{s}", model_dir, data, {"temperature": 1.0, "seed": s})[1] for s in (0, 5)}
    assert [r["output"] for r in mixed] == [by_seed[s][i]["output"] for i, s in enumerate(seeds)]
    assert any(a["output"] != b["output"] for a, b in zip(*by_seed.values()))


@pytest.mark.parametrize("as_list", [False, True])
def test_per_row_stop_strings_from_a_column_cut_exactly(tmp_path, model_dir, as_list):
    data = _data(tmp_path)
    _, free = _submit(tmp_path, "free", model_dir, data, {"max_tokens": 12})
    stops = [r["output"][3:5] if i % 3 else None for i, r in enumerate(free)]  # rows 0 and 3: null (none)
    column = pa.array([None if s is None else ["never here", s] for s in stops]) if as_list else pa.array(stops)
    data = _data(tmp_path, st=column)
    _, cut = _submit(tmp_path, "cut", model_dir, data, {"max_tokens": 12, "stop": {"column": "st"}})
    for i, (row, whole) in enumerate(zip(cut, free)):
        text = whole["output"]
        if stops[i] is None:
            assert (row["output"], row["finish_reason"]) == (text, "length"), f"row {i}"
        else:
            assert (row["output"], row["finish_reason"]) == (text[: text.find(stops[i])], "stop"), f"row {i}"


def test_bad_per_row_values_are_row_errors_naming_column_and_value(tmp_path, model_dir):
    nan = math.nan
    data = _data(
        tmp_path, text=[f"Review number {i}." for i in range(10)],
        temp=[0.5, None, 3.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, nan],
        p=[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        k=[0, 0, 0, 0, -1, 0, 0, 0, 0, 0],
        s=[1, 1, 1, 1, 1, -3, 1, 1, 1, 1],
        st=pa.array([["x"], None, None, None, None, None, ["a", ""], ["a", None], ["a"] * 17, None]))
    sampling = {"temperature": "temp", "top_p": "p", "top_k": "k", "seed": "s", "stop": {"column": "st"}}
    result, rows = _submit(tmp_path, "out", model_dir, data, sampling)
    assert (result.rows_ok, result.rows_error) == (1, 9)  # the job goes on
    assert [r["error"] for r in rows] == [
        None,
        "temperature column 'temp' is null; it must be 0 (greedy) or between 0.01 and 2",
        "temperature column 'temp' is 3.0; it must be 0 (greedy) or between 0.01 and 2",
        "top_p column 'p' is 0.0; it must be > 0 and <= 1",
        "top_k column 'k' is -1; it must be >= 0",
        "seed column 's' is -3; it must be between 0 and 9223372036854775807",
        "stop column 'st' holds an empty stop string (got [\"a\", \"\"])",
        "stop column 'st' holds a null stop string (got [\"a\", null])",
        "stop column 'st' holds 17 stop strings; at most 16 are allowed",
        "temperature column 'temp' is nan; it must be 0 (greedy) or between 0.01 and 2",
    ]
    assert all(r["finish_reason"] == "error" and r["output"] is None for r in rows[1:])


@pytest.mark.parametrize("sampling, columns, message", [
    ({"temperature": "c"}, {"c": ["hot"] * 6},
     "sampling.temperature: column 'c' has type string; it must hold numbers"),
    ({"top_k": "c"}, {"c": [1.0] * 6}, "sampling.top_k: column 'c' has type double; it must hold integers"),
    ({"seed": "c"}, {"c": [1.5] * 6}, "sampling.seed: column 'c' has type double; it must hold integers"),
    ({"stop": {"column": "c"}}, {"c": [1] * 6},
     "sampling.stop: column 'c' has type int64; it must hold strings or lists of strings"),
])
def test_a_column_of_the_wrong_type_is_a_job_error(tmp_path, model_dir, sampling, columns, message):
    with pytest.raises(InputDataError) as e:
        _submit(tmp_path, "out", model_dir, _data(tmp_path, **columns), sampling)
    assert e.value.message == message and e.value.exit_code == 65
