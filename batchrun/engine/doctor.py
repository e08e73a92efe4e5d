"""What this machine gives batchrun's engine (``batchrun doctor``): torch and its build, the devices, the
device and dtype ``engine.device: auto`` picks, and the attention backend that would run there."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

PACKAGES = ("torch", "transformers", "triton", "duckdb", "pyarrow", "llguidance", "polars")


def report() -> dict[str, Any]:
    import torch

    from batchrun import __version__
    from batchrun.engine.attention import choose_backend
    from batchrun.engine.loader import pick_device, pick_dtype

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"device": f"cuda:{i}", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    backend = choose_backend(device, getattr(torch, dtype)).name
    return {"batchrun": __version__, "python": platform.python_version(), "versions": versions,
            "torch_build": f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu",
            "cuda_available": torch.cuda.is_available(), "gpus": gpus, "auto_device": device, "auto_dtype": dtype,
            "attention": backend, "cpu_threads": torch.get_num_threads()}
