"""Plain helpers shared by the test modules (fixtures stay in conftest.py). Test modules import them from here
(``from helpers import write_job``), never from each other nor from the conftest module. tests/ is on sys.path
because it holds the rootdir conftest.py and no __init__.py (pytest's default "prepend" import mode).
The plans and the simulator have theirs in plan_helpers.py.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from batchrun.errors import BatchrunError

REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------------------ files and models
# The smallest valid job spec (tests of the spec and its YAML).
MINIMAL_SPEC = """\
model: {path: some/model}
input: {path: data.parquet}
prompt: {template: "Review: {{ text }}"}
output: {path: out/reviews}
"""


# A small job on a local model: model, data (a path or URL) and out to fill in.
SMALL_JOB = """
name: small
model: {{path: "{model}"}}
input: {{path: "{data}", id: id}}
prompt: {{template: "Review: {{{{ text }}}}", chat: false}}
sampling: {{max_tokens: 3, ignore_eos: true}}
output: {{path: "{out}", part_rows: 2}}
engine: {{device: cpu, batch_size: 2, threads: 1}}
"""


def write_job(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def make_tiny_model(directory: Path, arch: str = "llama", tokenizer_dir: str | None = None, seed: int = 0,
                    init: float = 0.5, **config) -> str:
    """A tiny random-weight causal LM saved as a model directory, with the SmolLM2 tokenizer (``config``:
    settings that replace the defaults below, such as the head counts).

    A large init scale makes its logits peaked, so greedy decoding has clear winners (see ../shared/DESIGN.md,
    "Testing exactness honestly").
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=False)
    if arch == "qwen3":
        common["head_dim"] = 16
    config = AutoConfig.for_model(arch, **(common | config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return str(directory)


# ------------------------------------------------------------------------------ output directories
# Resuming, damaging and refusing a copy of a finished SMALL_JOB (the ``made`` fixture of conftest.py).
def rows(out: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT id, text, output, output_tokens FROM '{out}/*.parquet' ORDER BY id").fetchall()


def copy(made, tmp_path: Path, complete: bool = True, name: str = "out") -> Path:
    """The finished output, or (``complete`` false) as a kill -9 after its first two parts leaves it."""
    out = tmp_path / name
    shutil.copytree(made["template"], out, symlinks=True)
    if not complete:
        for f in ("_SUCCESS", "_manifest.json", "part-000002.parquet"):
            (out / f).unlink()
    return out


def submit(made, out: Path, *sets: str, fresh: bool = False):
    """(exit code, JobResult or error text) of ``batchrun submit`` into ``out``."""
    from batchrun import api

    try:
        return 0, api.submit(made["job"], [f"output.path={out}", *sets], fresh=fresh)
    except BatchrunError as e:
        return e.exit_code, str(e)


def snapshot(directory: Path) -> dict[str, object]:
    """Every entry, never following a link: a file's bytes, a link's target."""
    out = {}
    for name in sorted(os.listdir(directory)):
        p = directory / name
        out[name] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes()
    return out


@contextmanager
def weights_never_load():
    from batchrun.engine import loader

    real = loader.load

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    loader.load = refuse
    try:
        yield
    finally:
        loader.load = real


def refused(made, out: Path, *sets: str, fresh: bool = False, code: int = 78) -> str:
    """Submit, expecting exit ``code`` without loading the weights and without changing a byte in ``out``."""
    before = snapshot(out) if out.is_dir() else None
    with weights_never_load():
        got, message = submit(made, out, *sets, fresh=fresh)
    assert got == code, message
    if before is not None:
        assert snapshot(out) == before
    return message


# ------------------------------------------------------------------------------ prompt templates
PROMPT_TABLE = pa.table({"text": ["hi there", None, "x"], "n": [1, 0, 2], "col name": ["A", "B", "C"],
                         "blank": [" ", "", " \n"]})


def rendered(template: str, table: pa.Table = PROMPT_TABLE, system: str | None = None):
    """(users, systems, errors) of batchrun.io.prompts.render."""
    from batchrun.io.prompts import render
    from batchrun.spec import PromptSpec

    return render(PromptSpec(template=template, system=system), table)


def crash_after_first_batch(monkeypatch, engine_cls) -> list:
    """Make ``engine_cls.run`` hand over its first batch of completions and then raise (a crash in the middle
    of a job). Returns that batch (filled once the engine runs)."""
    real_run = engine_cls.run
    first: list = []

    def run(self, requests, plan=None, interrupt=None):
        it = real_run(self, requests, plan, interrupt)
        first.extend(next(it))
        yield first
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(engine_cls, "run", run)
    return first


# ------------------------------------------------------------------------------ constraints
SENTIMENT = {"type": "object", "additionalProperties": False, "required": ["label", "score"],
             "properties": {"label": {"enum": ["positive", "negative"]},
                            "score": {"type": "integer", "minimum": 0, "maximum": 9}}}


def valid_against(value, schema) -> bool:
    """Is ``value`` valid against ``schema`` (only the schema features the constraint tests use)?"""
    if "enum" in schema:
        return value in schema["enum"]
    t = schema["type"]
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if t == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
                and all(valid_against(v, schema["items"]) for v in value))
    if t == "object":
        props = schema["properties"]
        return (isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(props)
                and all(valid_against(v, props[k]) for k, v in value.items()))
    raise AssertionError(f"unexpected schema {schema}")
