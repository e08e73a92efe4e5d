"""torch's CPU threads during GPU engine runs.

A GPU run computes on the device; on the host it needs one thread, the one that launches the steps (and the
mask worker's and llguidance's threads with a constraint). torch keeps a pool of intra-op threads, one per
CPU, for its CPU operators: the few it runs in a GPU step (ids and positions made into tensors, masks packed)
are small, but a parallel one wakes the whole pool (OpenMP's threads then wait a while for more work,
spinning). On the H200 machine (16 CPUs) a run of 512 rows without constraints used 4.1 CPU-seconds in 15 of
these threads over its 1.1 s, against 1.1 in the launching thread (``benchmarks/thread_cpu.py``), and CPUs
busy elsewhere slow the launching thread on that virtual machine (``benchmarks/pool_contention.py``). With
one thread, 512 constrained rows of the random 1b model used 3.4 CPU-seconds in all and took 1.74-1.96 s,
against 7.1 and 2.00-2.14 s with torch's own setting, interleaved in one process
(``benchmarks/results/constraint-h200.jsonl``). So while a GPU run goes on, torch uses ``GPU_THREADS``
intra-op thread (``torch.set_num_threads``), put back when the run ends, or the last of the runs that overlap
in the thread (torch's setting is each thread's own, OpenMP's: it is set for the thread that runs the engine,
whose operators are the ones that would wake the pool). ``BATCHRUN_GPU_TORCH_THREADS``: another number, or 0
to leave torch's setting as it is.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from batchrun.errors import RuntimeFailure

GPU_THREADS = 1
_LOCAL = threading.local()  # (per thread: the runs going on in it, and torch's setting before the first)


@contextmanager
def few(device: str) -> Iterator[None]:
    """An engine run on ``device``: on a GPU, with torch's intra-op threads set as the module's docstring says."""
    raw = os.environ.get("BATCHRUN_GPU_TORCH_THREADS", str(GPU_THREADS))
    if not raw.isdigit():
        raise RuntimeFailure(f"BATCHRUN_GPU_TORCH_THREADS={raw!r}: expected a number of torch's CPU threads "
                             f"during GPU runs ({GPU_THREADS}: the default), or 0 to leave torch's setting")
    threads = int(raw)
    if device == "cpu" or threads == 0:
        yield
        return

    held = getattr(_LOCAL, "held", None)
    if held is None:
        held = _LOCAL.held = {"runs": 0, "before": 0}
    if held["runs"] == 0:
        held["before"] = torch.get_num_threads()
        torch.set_num_threads(threads)
    held["runs"] += 1
    try:
        yield
    finally:
        held["runs"] -= 1
        if held["runs"] == 0:
            torch.set_num_threads(held["before"])
