"""Which CPUs slow which: the CPU topology as the kernel reports it, and as measured.

On a virtual machine the kernel's topology may hide that two vCPUs share one physical core (hyperthreads)
or a cache. This times a Python loop pinned to one CPU while another process keeps a second CPU busy (a
Python spin loop, ``alu``, or numpy copies larger than the caches, ``mem``), for every second CPU, against
the loop alone. ``engine.grammar_pool`` splits the CPUs between the thread that launches the steps and
llguidance's pool; a split that puts the two on one core's siblings slows the launches.

    python benchmarks/cpu_siblings.py [--cpus 0,1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import time
from pathlib import Path


def _spin(cpu: int, kind: str, stop) -> None:
    os.sched_setaffinity(0, [cpu])
    if kind == "alu":
        while not stop.is_set():
            x = 0
            for i in range(100_000):
                x += i
    else:
        import numpy as np

        a = np.ones(64 << 20 >> 3)  # 64 MiB
        b = np.empty_like(a)
        while not stop.is_set():
            np.copyto(b, a)


def _loop_s() -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x = 0
        for i in range(400_000):
            x += i
        best = min(best, time.perf_counter() - t)
    return best


def slowdown(cpu: int, other: int, kind: str) -> float:
    stop = mp.Event()
    p = mp.Process(target=_spin, args=(other, kind, stop))
    p.start()
    time.sleep(0.05)
    try:
        return _loop_s()
    finally:
        stop.set()
        p.join()


def topology() -> dict:
    out = {}
    base = Path("/sys/devices/system/cpu")
    for d in sorted(base.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        t = d / "topology"
        if t.exists():
            out[d.name] = {f: (t / f).read_text().strip() for f in ("core_id", "thread_siblings_list",
                                                                     "physical_package_id") if (t / f).exists()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpus", default="0,1", help="the CPUs whose loop is timed (comma-separated)")
    ap.add_argument("--out", help="append the result line (JSON) to this file")
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    row = {"bench": "cpu-siblings", "cpus": len(cpus), "machine": platform.node(),
           "lscpu": {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lscpu.splitlines() if ":" in ln)
                     if k.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                                      "L3 cache", "Hypervisor vendor", "CPU max MHz", "BogoMIPS")},
           "siblings": {k: v.get("thread_siblings_list") for k, v in topology().items()}, "measured": {}}
    for c in (int(x) for x in a.cpus.split(",")):
        os.sched_setaffinity(0, [c])
        alone = _loop_s()
        m = {"alone_ms": round(alone * 1e3, 2)}
        for kind in ("alu", "mem"):
            m[kind] = {o: round(slowdown(c, o, kind) / alone, 3) for o in cpus if o != c}
        row["measured"][c] = m
        os.sched_setaffinity(0, cpus)
    print(json.dumps(row, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
