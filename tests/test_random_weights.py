"""``model.load: random``: the spec's rules (exact messages), deterministic random weights, a whole job on a
random ``tiny`` model (greedy rows equal ``generate`` on the same random model) and ``batchrun plan`` on one,
with no weights read."""

from __future__ import annotations

import json

import duckdb
import pytest
import torch
from click.testing import CliRunner

from batchrun import api
from batchrun.cli import cli
from batchrun.engine import loader, random_weights
from batchrun.engine.batch import BatchEngine
from batchrun.errors import SpecError
from batchrun.spec import EngineSpec, ModelSpec, load_spec, validate_dict
from helpers import write_job

# ------------------------------------------------------------------------------------------------ the spec


def _model(**fields) -> dict:
    return {"name": "j", "model": fields, "input": {"path": "a.parquet"}, "prompt": {"template": "{{ text }}"},
            "output": {"path": "out"}}


@pytest.mark.parametrize("model, problem", [
    ({"path": "m", "size": "1b"},
     "model: size is only for load: random (got size: 1b); set load: random, or remove size"),
    ({"path": "m", "seed": 5},
     "model: seed is only for load: random (got seed: 5); set load: random, or remove seed"),
    ({}, "model: path is required (or load: random with a size)"),
    ({"load": "random"}, "model: load: random needs a size (tiny, 1b or 8b) or a path to take the config from"),
    ({"load": "random", "size": "1b", "path": "m", "tokenizer": "t"},
     "model: load: random takes the config from size or from path, not both (got size: 1b, path: 'm'); give the "
     "tokenizer as tokenizer"),
    ({"load": "random", "size": "1b"},
     "model: load: random with size: 1b needs a tokenizer (a tokenizer or model directory, a built-in model name, a "
     ".gguf file or a hub id)"),
    ({"load": "dummy", "path": "m"}, "model.load: must be one of 'weights' or 'random' (got 'dummy')"),
    ({"load": "random", "size": "2b", "tokenizer": "t"},
     "model.size: must be one of 'tiny', '1b' or '8b' (got '2b')"),
    ({"load": "random", "size": "1b", "tokenizer": "t", "seed": -1}, "model.seed: must be >= 0 (got -1)"),
    ({"load": "random", "size": "1b", "tokenizer": "t", "seed": "1"}, "model.seed: must be an integer (got '1')"),
])
def test_bad_combinations_are_refused_with_exact_messages(model, problem):
    with pytest.raises(SpecError) as ei:
        validate_dict(_model(**model))
    assert ei.value.problems == [problem]


def test_good_combinations_and_their_labels():
    by_size = validate_dict(_model(load="random", size="1b", tokenizer="t", seed=3)).model
    assert (by_size.path, by_size.size, by_size.seed, by_size.label) == (None, "1b", 3, "random:1b")
    by_path = validate_dict(_model(load="random", path="m")).model
    assert (by_path.size, by_path.tokenizer, by_path.label) == (None, None, "random:m")
    assert validate_dict(_model(path="m")).model.label == "m"


# ------------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_size_configs_are_the_benchmark_models(tok):
    """The sizes of ../shared/BENCHMARKS.md, counted on the meta device (nothing is built)."""
    c = random_weights.size_config("1b", tok)
    assert (c.model_type, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == ("llama", 49152, 8192,
                                                                                               False)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (2048, 16, 32, 8, 8192)
    params = {s: loader.estimate_weight_bytes(random_weights.size_config(s, tok), "bfloat16") // 2
              for s in ("1b", "8b")}
    assert 1.1e9 < params["1b"] < 1.2e9 and 7.3e9 < params["8b"] < 7.5e9  # ≈ 1.1 B and 7.4 B


def _tiny(tok, seed: int, device: str = "cpu", dtype=torch.float32):
    return random_weights.build(random_weights.size_config("tiny", tok), device, dtype, seed)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_weights_other_seed_other_weights(tok, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b, c = (_tiny(tok, s, device, dtype).state_dict() for s in (7, 7, 8))
    assert a.keys() == b.keys() == c.keys()
    params = list(a)
    assert all(a[k].device.type == device and a[k].dtype == dtype for k in params)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in params)
    w = torch.cat([a[k].float().flatten() for k in params])
    assert abs(w.mean().item()) < 1e-3 and 0.019 < w.std().item() < 0.021  # N(0, 0.02), norms included


def test_builtin_name_as_tokenizer(smollm2_dir):
    tok = loader.load_tokenizer(ModelSpec(load="random", size="tiny", tokenizer="smollm2-135m-instruct"))
    assert len(tok) == 49152 and tok.name_or_path == smollm2_dir


# ------------------------------------------------------------------------------------------------ a job

JOB = """
name: rnd
model: {{load: random, size: tiny, seed: 5, tokenizer: "{tokenizer}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Review: {{{{ text }}}}\\nSummary:", chat: false}}
sampling: {{max_tokens: 6, ignore_eos: true}}
output: {{path: "{out}", part_rows: 2}}
engine: {{device: cpu, batch_size: 2, step_tokens: 16}}
"""


def _no_weights_read(monkeypatch):
    """Reading any weights file, or building a model, fails the test."""
    def boom(*a, **k):
        raise AssertionError("weights were read or a model was built")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(random_weights, "build", boom)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


def test_job_on_a_random_model_equals_generate(tmp_path, tokenizer_dir, reviews_parquet, monkeypatch, tok):
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB.format(tokenizer=tokenizer_dir, data=reviews_parquet, out=out))
    seen = {}
    real_run = BatchEngine.run

    def recording(self, requests, plan=None, interrupt=None):
        prompts = {r.key: r.prompt_ids for r in requests}
        for batch in real_run(self, requests, plan, interrupt):
            seen.update({c.key: (prompts[c.key], c.token_ids) for c in batch})
            yield batch

    monkeypatch.setattr(BatchEngine, "run", recording)
    result = api.submit(load_spec(job))
    assert (result.status, result.rows_total, result.rows_ok, result.rows_error) == ("ok", 6, 5, 1)
    rows = duckdb.sql(f"SELECT id, output_tokens, finish_reason FROM '{out}/*.parquet' ORDER BY id").fetchall()
    assert rows == [("a", 6, "length"), ("b", 6, "length"), ("c", 6, "length"), ("d", 0, "error"),
                    ("e", 6, "length"), ("f", 6, "length")]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model"] == {"path": None, "resolved": "random:tiny", "device": "cpu", "dtype": "float32"}

    oracle = _tiny(tok, 5)  # the same random model, built again
    assert len(seen) == 5
    for prompt, got in seen.values():
        ids = torch.tensor([prompt])
        want = oracle.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=6, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert list(got) == want[0, ids.shape[1]:].tolist()


def test_plan_on_a_random_model_reads_no_weights(tmp_path, tokenizer_dir, reviews_parquet, monkeypatch):
    out = tmp_path / "out"
    job = write_job(tmp_path, JOB.format(tokenizer=tokenizer_dir, data=reviews_parquet, out=out))
    _no_weights_read(monkeypatch)
    r = CliRunner().invoke(cli, ["plan", str(job), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert (report["job"], report["rows"], report["rows_error"], report["max_output_tokens"]) == ("rnd", 6, 1, 30)
    assert not out.exists()
    facts = loader.model_facts(load_spec(job, ["model.size=8b", "model.dtype=bfloat16"]).model,
                               EngineSpec(device="cpu"))
    assert (facts.max_context, facts.kv_bytes_per_token) == (8192, 2 * 32 * 8 * 128 * 2)
