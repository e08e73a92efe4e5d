"""Shared by the GPU benchmarks: what a torch-profiler trace says about a run — the fraction of wall time the
GPU was busy (the union of kernel intervals) and how many launches the host made (kernels and graph
replays)."""

from __future__ import annotations

import torch

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


def busy_fraction(intervals: list[tuple[float, float]], wall: float) -> float:
    if not intervals:
        return 0.0
    intervals.sort()
    total, (start, end) = 0.0, intervals[0]
    for a, b in intervals[1:]:
        if a > end:
            total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    return (total + end - start) / wall


def summarize(prof, wall: float) -> dict:
    """GPU-busy fraction, host launches, kernels run and GPU seconds by kernel name of a profiled run."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name in LAUNCHES)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    intervals = [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in kernels]
    return {"busy": busy_fraction(intervals, wall), "launches": launches, "kernels": len(kernels),
            "by_name": by_name}
