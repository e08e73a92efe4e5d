"""Python's garbage collector during engine runs.

A run allocates container objects at every step (the rows' token lists, the grammar work's lists, the
scheduler's records), and now and then that sets off a full collection, which walks every object the process
tracks: the model's modules, the tokenizer, the libraries loaded, several hundred thousand objects. With SmolLM2
loaded that took 180 ms on a CPU, against steps of 20 to 100 ms on the H200. So while engine runs go on, the
objects alive when the first of them began are frozen (``gc.freeze``: a full collection then walks only what
was made since) and put back when the last one ends (runs in several threads may overlap). Garbage is still
freed as it was: by reference counts at once, and cycles among the objects made during the run by the
collector. ``BATCHRUN_GC_FREEZE=0`` leaves the collector as it is; a process that froze objects itself before
the first run is left as it is too (its own ``gc.unfreeze`` is its to call).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from batchrun.errors import RuntimeFailure

_LOCK = threading.Lock()
_STATE = {"runs": 0, "ours": False}  # engine runs going on in this process; whether they froze the objects


@contextmanager
def frozen() -> Iterator[None]:
    """An engine run, with the objects alive before it frozen (see the module's docstring)."""
    raw = os.environ.get("BATCHRUN_GC_FREEZE", "1")
    if raw not in ("0", "1"):
        raise RuntimeFailure(f"BATCHRUN_GC_FREEZE={raw!r}: expected 1 (freeze the objects alive when an engine "
                             "run starts: the default) or 0 (leave the garbage collector as it is)")
    if raw == "0":
        yield
        return
    with _LOCK:
        if _STATE["runs"] == 0:
            _STATE["ours"] = gc.get_freeze_count() == 0
        if _STATE["ours"]:
            gc.freeze()  # (a run starting while another goes on freezes what that one made so far, too)
        _STATE["runs"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["runs"] -= 1
            if _STATE["runs"] == 0 and _STATE["ours"]:
                _STATE["ours"] = False
                gc.unfreeze()
