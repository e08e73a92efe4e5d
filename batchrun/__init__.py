"""batchrun: an offline batch-inference job runner for LLMs.

Python API: ``from batchrun import submit, load_spec``; the CLI (``batchrun``) is a thin layer over it.
Names are imported lazily so that ``import batchrun`` stays cheap (no torch until a model is needed).
"""

__version__ = "0.1.0"

_API = {"JobResult", "plan", "status", "submit", "validate"}
_SPEC = {"JobSpec", "load_spec"}
__all__ = ["JobResult", "JobSpec", "__version__", "load_spec", "plan", "status", "submit", "validate"]


def __getattr__(name: str):
    if name in _API:
        from batchrun import api

        return getattr(api, name)
    if name in _SPEC:
        from batchrun import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
