"""A process-wide setting held while engine runs go on (``WhileRuns``): made when the first run of the process
starts and put back when the last one ends, however the runs overlap (several threads may run engines at once).
``engine.masks`` holds the GIL's switch interval so, ``engine.collector`` the frozen objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class WhileRuns:
    """One setting's count of the runs holding it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._runs = 0
        self._undo: Callable[[], None] = lambda: None

    @contextmanager
    def held(self, make: Callable[[], Callable[[], None]]) -> Iterator[None]:
        """The block (one engine run) with the setting held: ``make()`` makes it when no other run holds it and
        returns what puts it back, called when the last run holding it ends."""
        with self._lock:
            if self._runs == 0:
                self._undo = make()
            self._runs += 1
        try:
            yield
        finally:
            with self._lock:
                self._runs -= 1
                if self._runs == 0:
                    self._undo()
