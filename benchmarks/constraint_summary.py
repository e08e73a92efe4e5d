"""A table of what the masks add, from ``constraint_gpu.py``'s result lines: per line (one process) and per
kind, ``step_added`` (each step at its fastest over the repeats), the median of the paired per-repeat figures
(``run_share_median``), and where the added time went (the mask worker's pool work, the launches, the waits
for the masks, the launching thread's record-and-start), in ms per step of at least ``step_batch`` rows.

    python benchmarks/constraint_summary.py benchmarks/results/constraint-h200.jsonl [--last N] [--commit C]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import share_median


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(lines: list[dict]) -> list[str]:
    out = ["| commit | rows | kind | step_added | runs' median | pool | launch | wait | resolve | start+finish |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for d in lines:
        for kind, v in (d.get("step_added") or {}).items():
            if not isinstance(v, dict) or v.get("added_share") is None:
                continue
            n = v["steps"] or 1
            ph = v.get("phases_added_s", {})

            def ms(*names, ph=ph, n=n):
                return f"{1000 * sum(ph.get(x, 0.0) for x in names) / n:+.1f}"

            runs = v.get("run_share_median")
            if runs is None:  # (lines written before the median was)
                runs = share_median(v.get("run_shares") or [])
            out.append(f"| {d.get('commit', '?')} | {d['rows']} | {kind} | {100 * v['added_share']:+.1f}% | "
                       + (f"{100 * runs:+.1f}%" if runs is not None else "—")
                       + f" | {ms('pool_masks')} | {ms('launch_forward')} | {ms('wait_masks')} | {ms('resolve')} | "
                       f"{ms('start_masks', 'finish_masks')} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--last", type=int, default=None, help="only the last N lines")
    ap.add_argument("--commit", default=None, help="only the lines of this commit")
    a = ap.parse_args()
    lines = [d for d in rows(a.path) if d.get("bench") == "constraint-gpu" and (a.commit is None
                                                                                or d.get("commit") == a.commit)]
    print("\n".join(table(lines[-a.last:] if a.last else lines)))


if __name__ == "__main__":
    main()
