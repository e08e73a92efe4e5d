"""Which of the process's threads use the CPU: each thread's CPU seconds from /proc (Linux), grouped by the
thread's name, between two snapshots (``snapshot``, ``busiest``). The main thread is "main"; a thread that
ended between the snapshots is not counted.

A constrained GPU run used about 2.4 CPUs in all while its launching thread used one
(``benchmarks/constraint_gpu.py``: ``process_cpu_s`` against ``main_cpu_s``); this says which threads the
rest were (CUDA's, torch's, llguidance's pool, the mask worker).
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def snapshot() -> dict[int, tuple[str, float]]:
    """Each thread of this process: (name, CPU seconds so far); {} where /proc is missing."""
    out = {}
    main = os.getpid()
    for task in Path(f"/proc/{main}/task").glob("*") if Path(f"/proc/{main}/task").exists() else []:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # (the thread ended)
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        tid = int(task.name)
        out[tid] = ("main" if tid == main else name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def busiest(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], top: int = 8) -> dict:
    """CPU seconds between the snapshots by thread name (with how many threads had it), the busiest first."""
    by: dict[str, list] = {}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        entry = by.setdefault(name, [0.0, 0])
        entry[0] += used
        entry[1] += used > 0
    ranked = sorted(by.items(), key=lambda kv: -kv[1][0])[:top]
    return {name: {"cpu_s": round(s, 2), "threads": n} for name, (s, n) in ranked if s > 0}
