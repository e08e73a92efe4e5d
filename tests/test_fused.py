"""The fused RMSNorm and SwiGLU kernels (``engine.fused``): against transformers' own layers, in Triton's
interpreter on the CPU (float32 and float16: the interpreter rounds to bfloat16 by truncation, so bfloat16 is
checked on a GPU only), and what ``install`` changes in a model."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from batchrun.engine import fused
from batchrun.errors import RuntimeFailure

# Triton's interpreter on the CPU (conftest sets it where there is no GPU); on a GPU machine, the GPU.
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many units in the last place of ``want``'s dtype each value is off."""
    step = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    return ((got.float() - want.float()).abs() / step).ceil()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernels_compute_what_transformers_layers_compute(dtype):
    """RMSNorm (transformers' LlamaRMSNorm) and ``silu(gate) * up`` (its MLP's product): the same values but
    for a unit in the last place here and there (another order of the sum; ``exp``)."""
    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(576, eps=1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(3, 37, 576, dtype=dtype).to(DEV) * 3
    with torch.no_grad():
        want, got = norm(x), fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == want.shape and got.dtype == want.dtype
    off = _ulps(got, want)
    assert off.max() <= (4 if dtype == torch.float32 else 1 if DEV == "cpu" else 2)  # (GPU: rsqrt.approx)
    assert (off > 0).float().mean() < (0.5 if dtype == torch.float32 else 0.01)
    gate_up = torch.randn(5, 7, 2 * 1536, dtype=dtype).to(DEV) * 4
    want = torch.nn.functional.silu(gate_up[..., :1536]) * gate_up[..., 1536:]
    got = fused.silu_mul(gate_up)
    assert got.shape == want.shape == (5, 7, 1536)
    assert (got.float() - want.float()).abs().max() <= 4 * torch.finfo(dtype).eps * want.float().abs().max()
    assert fused.rms_norm(x[:, :0], norm.weight, 1e-5).shape == (3, 0, 576)  # (no rows: no launch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_rotary_kernel_equals_transformers_rotary_embedding(dtype):
    """Queries and keys laid out as transformers' attention has them (transposed views), 4 query heads over 2
    key heads: exactly transformers' values, in its memory layout."""
    torch.manual_seed(2)
    q = torch.randn(2, 7, 4, 64, dtype=dtype).to(DEV).transpose(1, 2)
    k = torch.randn(2, 7, 2, 64, dtype=dtype).to(DEV).transpose(1, 2)
    cos, sin = torch.randn(2, 7, 64, dtype=dtype).to(DEV), torch.randn(2, 7, 64, dtype=dtype).to(DEV)
    plain = getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped__", modeling_llama.apply_rotary_pos_emb)
    want_q, want_k = plain(q, k, cos, sin)
    got_q, got_k = fused.rotary(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.stride() == want_q.stride() and got_k.stride() == want_k.stride()
    got_q, got_k = fused.rotary(q, k, cos[:1], sin[:1])  # (one row of cos and sin for all: position ids [1, T])
    want_q, want_k = plain(q, k, cos[:1], sin[:1])
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_install_fuses_the_norms_and_mlps_only_where_asked(arch, monkeypatch):
    """With ``BATCHRUN_FUSED=1``, ``install`` changes every RMSNorm (Qwen3's per-head q/k norms too), every
    SwiGLU MLP, whose gate and up weights become views of one tensor, and the family's rotary embedding.
    Outside ``active`` the model computes exactly as before; inside, its logits agree with transformers' to
    float32 rounding."""
    monkeypatch.setenv("BATCHRUN_FUSED", "1")
    family = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    monkeypatch.setattr(family, "apply_rotary_pos_emb", family.apply_rotary_pos_emb)  # (put back afterwards)
    config = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(DEV).eval()
    ids = torch.randint(0, 256, (2, 11)).to(DEV)
    with torch.no_grad():
        plain = model(ids).logits
    norms = 2 * 2 + 1 + (2 * 2 if arch == "qwen3" else 0)
    with torch.inference_mode():  # (where an engine may be made: the joined weights are plain tensors still)
        assert fused.install(model) == norms + 2 + 1
    assert fused.install(model) == norms + 2 + 1  # (idempotent)
    assert torch.equal(model(ids).logits.detach(), plain)  # (with autograd on: no inference tensors inside)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        joined = mlp._batchrun_gate_up
        assert joined.shape == (2 * 96, 64)
        assert mlp.gate_proj.weight.data_ptr() == joined.data_ptr()
        assert mlp.up_proj.weight.data_ptr() == joined.data_ptr() + 96 * 64 * joined.element_size()
        assert torch.equal(model(ids).logits, plain)
        calls = []
        for name in ("rms_norm", "silu_mul", "rotary"):
            kernel = getattr(fused, name)
            monkeypatch.setattr(fused, name, lambda *a, k=kernel, n=name: calls.append(n) or k(*a))
        with fused.active(anywhere=True):
            got = model(ids).logits
        assert calls.count("rms_norm") == norms and calls.count("silu_mul") == 2 and calls.count("rotary") == 2
        if DEV == "cpu":
            with fused.active():  # (a GPU's only: these tensors are on the CPU)
                assert torch.equal(model(ids).logits, plain)
            assert len(calls) == norms + 2 + 2
    assert torch.allclose(got, plain, rtol=1e-4, atol=1e-4), (got - plain).abs().max()


def test_fused_kernels_are_on_by_default_off_with_0_and_a_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BATCHRUN_FUSED", "0")
    model = torch.nn.Sequential(modeling_llama.LlamaRMSNorm(8))
    assert fused.install(model) == 0 and not hasattr(model[0], "_batchrun_fused")
    monkeypatch.delenv("BATCHRUN_FUSED")
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    assert fused.install(model) == 2 and hasattr(model[0], "_batchrun_fused")  # (the norm; Llama's rotary)
    monkeypatch.setenv("BATCHRUN_FUSED", "yes")
    with pytest.raises(RuntimeFailure, match=r"BATCHRUN_FUSED='yes': expected 1 \(fused .* or 0"):
        fused.install(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_kernels_round_bfloat16_as_transformers_does_on_the_gpu():
    """bfloat16 on the GPU: RMSNorm and silu-mul within a unit or two in the last place, rotary exact."""
    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(2048, eps=1e-5).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(2048))
    x = torch.randn(300, 2048, dtype=torch.bfloat16, device="cuda") * 3
    with torch.no_grad():
        off = _ulps(fused.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    assert off.max() <= 2 and (off > 0).float().mean() < 0.01
    q = torch.randn(1, 300, 32, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(1, 300, 8, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    cos, sin = (torch.randn(1, 300, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    plain = getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped__", modeling_llama.apply_rotary_pos_emb)
    assert all(torch.equal(a, b) for a, b in zip(fused.rotary(q, k, cos, sin), plain(q, k, cos, sin)))
    gate_up = torch.randn(300, 2 * 8192, dtype=torch.bfloat16, device="cuda") * 4
    want = torch.nn.functional.silu(gate_up[:, :8192]) * gate_up[:, 8192:]
    off = _ulps(fused.silu_mul(gate_up), want)
    assert off.max() <= 2 and (off > 0).float().mean() < 0.01
