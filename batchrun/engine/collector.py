"""Python's garbage collector during engine runs.

A run allocates container objects at every step (the rows' token lists, the grammar work's lists, the
scheduler's records), and now and then that sets off a full collection, which walks every object the process
tracks: the model's modules, the tokenizer, the libraries loaded, several hundred thousand objects. With SmolLM2
loaded that took 180 ms on a CPU, against steps of 20 to 100 ms on the H200. So while engine runs go on, the
objects alive when the first of them began are frozen (``gc.freeze``: a full collection then walks only what
was made since) and put back when the last one ends (runs in several threads may overlap). On the H200
(the random-weight 1b model, 512 constrained rows) full collections inside the runs took 200 to 285 ms each.
Garbage is still freed as it was: by reference counts at once, and cycles among the objects made during the
runs by the collector. Python cannot put back only some frozen objects, so objects a process froze itself
before a run are put back too when the last run ends (the H200 machine's Python starts with a few hundred
frozen): leaving everything frozen instead would keep, for good, any garbage cycle alive at a run's start.
``BATCHRUN_GC_FREEZE=0`` leaves the collector as it is.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from batchrun.engine.held import WhileRuns
from batchrun.errors import RuntimeFailure

_FROZEN = WhileRuns()


@contextmanager
def frozen() -> Iterator[None]:
    """An engine run, with the objects alive when the first run going on began frozen (the module's
    docstring)."""
    raw = os.environ.get("BATCHRUN_GC_FREEZE", "1")
    if raw not in ("0", "1"):
        raise RuntimeFailure(f"BATCHRUN_GC_FREEZE={raw!r}: expected 1 (freeze the objects alive when an engine "
                             "run starts: the default) or 0 (leave the garbage collector as it is)")
    if raw == "0":
        yield
        return
    with _FROZEN.held(_freeze):
        yield


def _freeze() -> Callable[[], None]:
    gc.freeze()
    return gc.unfreeze
