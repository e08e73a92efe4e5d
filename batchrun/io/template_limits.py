"""The limits on the work a Jinja template does, and the checks on values that enforce them.

Under ``time_limit(seconds)`` a render may take that long (``tick`` checks the deadline; it is kept per thread,
not in a signal, so rendering may run in any thread). No value may be over MAX_CHARS characters or items
(``measure`` counts through containers as printing would) and no integer over MAX_INT_BITS bits: ``bounded``
checks a value (a lazy sequence is wrapped in a ``BoundedIter`` that checks as it is consumed) and
``bounded_join`` joins text without allocating past the limit. Past a limit: ``TemplateLimitError``.
This module knows Python values (and Jinja's ``Namespace``), not templates or environments: ``batchrun.io.sandbox``
puts these checks in a Jinja environment's hooks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jinja2.utils import Namespace

MAX_CHARS = 4_000_000  # a rendered template, and any value a template builds (characters or items)
MAX_INT_BITS = 16_384  # integers a template computes (Python prints at most 4,300 digits anyway)
MAX_COUNT = 100_000  # counts a filter loops over in Python (batch, slice), like Jinja's own range() cap
MAX_WIDTH = 100_000  # a width or precision in % or str.format formatting


class TemplateLimitError(Exception):
    """A template went past one of batchrun's limits (time, output size, value size, integer size)."""


_state = threading.local()  # .deadline: the monotonic time the current render must end by; .seconds: its budget


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Renders in this block (on this thread) must all end within ``seconds`` of its start."""
    _state.deadline, _state.seconds = time.monotonic() + seconds, seconds
    try:
        yield
    finally:
        _state.deadline = None


def tick() -> None:
    """Raise ``TemplateLimitError`` if this thread's render is past its ``time_limit`` deadline."""
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than {_state.seconds:g} s")


def too_big(what: str) -> TemplateLimitError:
    """The error for a value that would be over MAX_CHARS (``what`` names it), for the caller to raise."""
    return TemplateLimitError(f"{what} would be over {MAX_CHARS:,} characters or items")


def _children(v: Any) -> list[Any] | None:
    """The values inside a container (None for a scalar)."""
    if isinstance(v, (list, tuple)):
        return v
    if isinstance(v, (set, frozenset)):
        return list(v)
    if isinstance(v, dict):
        return [*v.keys(), *v.values()]
    if isinstance(v, Namespace):
        return [object.__getattribute__(v, "_Namespace__attrs")]
    return None


def _scalar_size(v: Any) -> int:
    if isinstance(v, (str, bytes, bytearray)):
        return len(v)
    return v.bit_length() // 32 + 1 if isinstance(v, int) else 1


def measure(value: Any, limit: int = MAX_CHARS) -> int:
    """Characters and items in ``value``, counted through containers as printing it would (a list holding one
    string twice counts it twice), but each container walked once (a list nested in itself 60 times over is
    measured in 60 steps); returns a number over ``limit`` as soon as it is known to be."""
    if _children(value) is None:
        return _scalar_size(value)
    if type(value) in (list, tuple) and all(type(x) is str for x in value):  # the common case, fast
        return len(value) + 1 + sum(map(len, value))
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    steps = 0
    while stack:
        v, done = stack.pop()
        key, kids = id(v), _children(v)
        if done:
            open_ids.discard(key)
            size = len(kids) + 1
            for k in kids:
                size += sizes.get(id(k), 1) if _children(k) is not None else _scalar_size(k)
                if size > limit:
                    return size
            sizes[key] = size
            continue
        if key in sizes or key in open_ids:  # walked already, or a namespace holding itself (counted as 1)
            continue
        open_ids.add(key)
        stack.append((v, True))
        stack.extend((k, False) for k in kids if _children(k) is not None and id(k) not in sizes)
        steps += 1
        if not steps & 0xFFF:
            tick()
    return sizes[id(value)]


class BoundedIter:
    """An iterator that checks the row's deadline at every item (for loops, lazy filter results) and, when
    ``sized``, that the items it has given total at most MAX_CHARS."""

    def __init__(self, iterable: Any, sized: bool):
        self._it, self._sized, self._size = iter(iterable), sized, 0

    def __iter__(self) -> BoundedIter:
        return self

    def __next__(self) -> Any:
        tick()
        item = next(self._it)
        if self._sized:
            self._size += measure(item)
            if self._size > MAX_CHARS:
                raise too_big("a sequence")
        return item


def bounded(value: Any) -> Any:
    """``value`` if it is within the limits (a lazy sequence is wrapped to be checked as it is consumed)."""
    if isinstance(value, (str, bytes)):
        if len(value) > MAX_CHARS:
            raise too_big("a string")
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"an integer would be over {MAX_INT_BITS:,} bits")
    elif isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
        if measure(value) > MAX_CHARS:
            raise too_big("a value")
    elif isinstance(value, Iterator) and not isinstance(value, BoundedIter):
        return BoundedIter(value, sized=True)
    return value


def bounded_join(pieces: Any, sep: str = "") -> str:
    """``sep.join`` over the pieces' strings, refused before it allocates more than MAX_CHARS."""
    out, total = [], 0
    for piece in pieces:
        text = piece if isinstance(piece, str) else str(piece)
        total += len(text) + (len(sep) if out else 0)
        if total > MAX_CHARS:
            raise too_big("the rendered (or joined) text")
        out.append(text)
    return sep.join(out)
