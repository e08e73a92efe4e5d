"""Shared by the benchmark scripts: the git commit being measured, and appending a result line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short commit of the checkout: $BATCHRUN_COMMIT if set (a copy of the tree whose .git is not the
    one measured, e.g. on a remote GPU machine), else git's ('' where there is no git)."""
    import os

    if os.environ.get("BATCHRUN_COMMIT"):
        return os.environ["BATCHRUN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def record(row: dict, path: str | Path | None) -> None:
    """Print ``row`` as one JSON line and, if ``path`` is given, append it there."""
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
