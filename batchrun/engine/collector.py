"""Python's garbage collector during engine runs.

A run allocates container objects at every step (the rows' token lists, the grammar work's lists, the
scheduler's records), and now and then that sets off a full collection, which walks every object the process
tracks: the model's modules, the tokenizer, the libraries loaded, several hundred thousand objects. With SmolLM2
loaded that took 180 ms on a CPU, against steps of 20 to 100 ms on the H200. So while engine runs go on, the
objects alive when the first of them began are frozen (``gc.freeze``: a full collection then walks only what
was made since) and put back when the last one ends (runs in several threads may overlap). On the H200
(the random-weight 1b model, 512 constrained rows) full collections inside the runs took 200 to 285 ms each. Garbage is
still freed as it was: by reference counts at once, and cycles among the objects made during the runs by the
collector. A process that had frozen objects before (its own, or its interpreter's: the H200 machine's Python
starts with a few hundred frozen) keeps everything frozen after the runs too, since Python cannot put back
only some of them: ``gc.unfreeze`` is its to call. ``BATCHRUN_GC_FREEZE=0`` leaves the collector as it is.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from batchrun.errors import RuntimeFailure

_LOCK = threading.Lock()
_STATE = {"runs": 0, "ours": False}  # engine runs going on in this process; whether they put the objects back


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
