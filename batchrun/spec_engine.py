"""The ``engine`` section of a job spec: how the model is executed, on one device or several workers.

``backend``, ``device`` and the engine's sizes; ``devices``, ``executor`` and ``ray_address`` for several workers
(``batchrun.runtime.distribute``). Pydantic is used here as in ``batchrun.spec``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEVICE = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSpec(_Strict):
    """How the model is executed."""

    backend: Literal["batchrun", "reference"] = "batchrun"
    device: str = Field(default="auto", pattern=DEVICE)
    batch_size: int = Field(default=16, ge=1, le=4096, strict=True)
    threads: int | None = Field(default=None, ge=1, le=1024, strict=True)
    step_tokens: int = Field(default=8192, ge=16, le=1_048_576, strict=True)  # prefill tokens per step
    block_size: int = Field(default=16, ge=1, le=1024, strict=True)  # KV cache block, tokens
    kv_budget_tokens: int | None = Field(default=None, ge=1, le=1_000_000_000, strict=True)  # None: from memory
    # Several workers (runtime/distribute.py): one process, or Ray actor, per device, each running the engine
    # over shards of the plan. None: one device (``device``), in this process. auto: every visible GPU.
    devices: str | list[str] | None = None
    executor: Literal["local", "ray"] = "local"  # ray: one Ray actor per device, on a Ray cluster
    ray_address: str | None = Field(default=None, min_length=1)  # None: RAY_ADDRESS, or start a local Ray

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> str | list[str] | None:
        listed = isinstance(v, list) and all(isinstance(d, str) for d in v)
        if v is not None and not isinstance(v, str) and not listed:
            raise ValueError(f"must be auto or a list of devices such as [cuda:0, cuda:1] (got {v!r})")
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"must be auto or a list of devices such as [cuda:0, cuda:1] (got {v!r})")
        if isinstance(v, list):
            if not 1 <= len(v) <= 256:
                raise ValueError(f"a list of 1 to 256 devices (got {len(v)})")
            bad = [d for d in v if not re.match(r"^(cpu|cuda(:[0-9]+)?)$", d)]
            if bad:
                raise ValueError(f"each device must be cpu, cuda or cuda:N (got {bad[0]!r})")
        return v

    @model_validator(mode="after")
    def _workers(self) -> EngineSpec:
        if self.devices is not None and self.device != "auto":
            raise ValueError("device and devices are both set: use one (devices for several workers)")
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address needs executor: ray")
        return self
