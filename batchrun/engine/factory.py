"""The engine a job runs on, and the one rule for its KV budget (``submit``, ``plan`` and benchmarks use both).

The KV budget, in tokens, whole blocks:
1. ``engine.kv_budget_tokens`` if the spec sets it; otherwise
2. automatic: on CUDA 90% of the free GPU memory once the weights are loaded (``submit`` measures it after
   loading them; ``plan``, which loads none, subtracts their estimated size from the free memory now), on
   CPU a quarter of the machine's memory, at most 2 GiB of KV (the pool is allocated up front); bytes per
   token at the dtype the job really runs in;
3. then capped by what the requests can ever use: each row's prompt + max_tokens + 2 blocks (one for
   rounding up, one for the admission rule's allowance), rounded up to whole blocks; at least one block.
This module knows the spec's engine section and the engine classes, nothing of input, prompts or output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from batchrun.engine.loader import LoadedModel, ModelFacts, loaded_facts
from batchrun.engine.requests import Engine, Request, SamplingParams
from batchrun.errors import SpecError
from batchrun.spec import EngineSpec, JobSpec, SamplingSpec

log = logging.getLogger("batchrun")

GPU_MEMORY_FRACTION = 0.9  # the rest: activations, logits, the allocator's slack
CPU_KV_BYTES_MAX = 2 << 30


def kv_budget(engine: EngineSpec, facts: ModelFacts, requests: Sequence[Request]) -> int:
    """The KV budget in tokens (a multiple of ``engine.block_size``) for running ``requests``."""
    bs = engine.block_size
    budget = engine.kv_budget_tokens or auto_kv_budget(facts)
    need = sum(len(r.prompt_ids) + r.max_tokens + 2 * bs for r in requests)
    budget = max(min(budget // bs * bs, -(-need // bs) * bs), bs)
    if engine.kv_budget_tokens:
        room = device_room(facts)
        if budget * facts.kv_bytes_per_token > room:
            raise SpecError(f"engine.kv_budget_tokens: {budget:,} tokens of KV need "
                            f"{budget * facts.kv_bytes_per_token / 2**30:.1f} GiB on {facts.device}, which has "
                            f"about {room / 2**30:.1f} GiB for it; lower it or leave it unset (automatic)")
    return budget


def device_room(facts: ModelFacts) -> int:
    """Bytes the KV pool could take at most: the free GPU memory less the weights still to load, or the
    machine's memory on CPU."""
    if facts.device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(facts.device))
        return free - facts.pending_weight_bytes
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def shared_kv_budget(loaded: LoadedModel, share: int) -> int | None:
    """The automatic KV budget of one of ``share`` workers on the same GPU (each loads its own weights): its
    part of the device's memory less its weights; None off CUDA or for a worker alone on its device."""
    if share <= 1 or not loaded.device.startswith("cuda"):
        return None
    import torch

    facts = loaded_facts(loaded)
    total = torch.cuda.get_device_properties(torch.device(loaded.device)).total_memory
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return max(int(total * GPU_MEMORY_FRACTION / share - weights) // facts.kv_bytes_per_token, 1)


def auto_kv_budget(facts: ModelFacts) -> int:
    """KV tokens that fit the device's memory when the spec names no budget (before the cap by requests)."""
    if facts.device.startswith("cuda"):
        room = int(device_room(facts) * GPU_MEMORY_FRACTION)
    else:
        room = min(device_room(facts) // 4, CPU_KV_BYTES_MAX)
    return max(room // facts.kv_bytes_per_token, 1)


def sampling_params(sampling: SamplingSpec) -> SamplingParams:
    """The engine's sampling settings. A field read from a column (per row) keeps its default here: every
    request then carries its own settings (``Request.sampling``)."""
    s = sampling
    d = SamplingParams()
    return SamplingParams(temperature=d.temperature if s.column("temperature") else s.temperature,
                          top_p=d.top_p if s.column("top_p") else s.top_p,
                          top_k=d.top_k if s.column("top_k") else s.top_k,
                          stop=d.stop if s.column("stop") else tuple(s.stop), ignore_eos=s.ignore_eos,
                          logprobs=s.logprobs)


def make_engine(spec: JobSpec, loaded: LoadedModel, requests: Sequence[Request]) -> Engine:
    """The engine ``spec.engine.backend`` names, for ``requests``: the reference engine or batchrun's."""
    params = sampling_params(spec.sampling)
    e = spec.engine
    if e.backend == "reference":
        from batchrun.engine.reference import ReferenceEngine

        return ReferenceEngine(loaded, params, batch_size=e.batch_size)
    from batchrun.engine.batch import BatchEngine

    budget = kv_budget(e, loaded_facts(loaded), requests)
    log.info("engine: batchrun, KV budget %d tokens in blocks of %d", budget, e.block_size)
    return BatchEngine(loaded, params, kv_budget_tokens=budget, block_size=e.block_size, step_tokens=e.step_tokens)


def kv_usage(engine: Engine) -> tuple[int | None, int | None]:
    """(KV budget, peak KV held) in tokens, whole blocks, after ``engine.run``; None where the engine has no
    KV pool (the reference engine), and a None peak where its last run did not finish (stopped)."""
    stats = getattr(engine, "stats", None) or {}
    budget = stats.get("kv_budget_tokens")
    if budget is None and hasattr(engine, "num_blocks"):  # (no finished run yet)
        budget = engine.num_blocks * engine.block_size
    return budget, stats.get("kv_peak_tokens")
