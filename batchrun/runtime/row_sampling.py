"""Each row's sampling settings: ``sampling.temperature``, ``top_p``, ``top_k`` and ``seed`` are a number or
the name of a column, ``stop`` is stop strings or ``{column: NAME}``.

A column of the wrong type is a job error (InputDataError, exit 65); a bad value (null where a value is
needed, out of range) is that row's error, naming the column and the value. A seed column's value takes the
place of ``sampling.seed`` for its row (the row's seed still derives from it and the row's id). No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from batchrun.engine.requests import SamplingParams
from batchrun.errors import InputDataError
from batchrun.io.source import Source, require_columns
from batchrun.spec import JobSpec
from batchrun.spec_sampling import MAX_STOP, MIN_TEMPERATURE
from batchrun.spec_yaml import show

_NUMBER = (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "numbers")
_INTEGER = (pa.types.is_integer, "integers")
# field: (column type check, what it must hold, value check, what a value must be)
_RULES: dict[str, tuple[Callable[[pa.DataType], bool], str, Callable[[Any], bool], str]] = {
    "temperature": (*_NUMBER, lambda v: v == 0 or MIN_TEMPERATURE <= v <= 2,
                    f"it must be 0 (greedy) or between {MIN_TEMPERATURE} and 2"),
    "top_p": (*_NUMBER, lambda v: 0 < v <= 1, "it must be > 0 and <= 1"),
    "top_k": (*_INTEGER, lambda v: v >= 0, "it must be >= 0"),
    "seed": (*_INTEGER, lambda v: 0 <= v < 2**63, f"it must be between 0 and {2**63 - 1}"),
}


@dataclass
class RowSampling:
    params: list[SamplingParams] | None  # each row's settings; None: no column, every row has the job's
    seeds: list[int]  # each row's seed: sampling.seed, or its seed column's value (0 where that is bad)
    errors: dict[int, str]  # row -> why its settings are bad (the first bad field)


def row_sampling(spec: JobSpec, source: Source) -> RowSampling:
    """Each row's sampling settings and seed, and (row -> message) for rows whose values are bad."""
    s = spec.sampling
    n = source.num_rows
    values: dict[str, list[Any]] = {}
    errors: dict[int, str] = {}
    for name, (type_ok, holds, ok, rule) in _RULES.items():
        column = s.column(name)
        if column is None:
            values[name] = [getattr(s, name)] * n
            continue
        col = _column(source, name, column)
        if not type_ok(col.type):
            raise InputDataError(f"sampling.{name}: column {column!r} has type {col.type}; it must hold {holds}")
        values[name] = col.to_pylist()
        for i, v in enumerate(values[name]):
            if v is None or (isinstance(v, float) and math.isnan(v)) or not ok(v):
                errors.setdefault(i, f"{name} column {column!r} is {_show(v)}; {rule}")
    values["stop"] = _stops(spec, source, errors)
    seeds = [0 if v is None or i in errors else v for i, v in enumerate(values["seed"])]
    if not any(s.column(name) for name in ("temperature", "top_p", "top_k", "stop")):
        return RowSampling(None, seeds, errors)
    made: dict[SamplingParams, SamplingParams] = {}  # (equal settings share one object)
    params = []
    for t, p, k, stop in zip(values["temperature"], values["top_p"], values["top_k"], values["stop"]):
        one = SamplingParams(temperature=float(t or 0), top_p=float(p or 1), top_k=int(k or 0), stop=stop,
                             ignore_eos=s.ignore_eos)
        params.append(made.setdefault(one, one))
    return RowSampling(params, seeds, errors)


def _stops(spec: JobSpec, source: Source, errors: dict[int, str]) -> list[tuple[str, ...]]:
    """Each row's stop strings: the spec's, or its stop column's (a string, a list of strings, or null: none)."""
    column = spec.sampling.column("stop")
    if column is None:
        return [tuple(spec.sampling.stop)] * source.num_rows
    col = _column(source, "stop", column)
    t = col.type
    is_text = pa.types.is_string(t) or pa.types.is_large_string(t)
    is_list = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))
    if not (is_text or is_list or pa.types.is_null(t)):
        raise InputDataError(f"sampling.stop: column {column!r} has type {t}; it must hold strings or lists of "
                             "strings")
    out = []
    for i, v in enumerate(col.to_pylist()):
        stop = () if v is None else (v,) if isinstance(v, str) else tuple(v)
        problem = None
        if any(x is None for x in stop):
            problem = f"holds a null stop string (got {_show(v)})"
        elif any(x == "" for x in stop):
            problem = f"holds an empty stop string (got {_show(v)})"
        elif len(stop) > MAX_STOP:
            problem = f"holds {len(stop)} stop strings; at most {MAX_STOP} are allowed"
        if problem:
            errors.setdefault(i, f"stop column {column!r} {problem}")
            stop = ()
        out.append(stop)
    return out


def _column(source: Source, name: str, column: str) -> pa.ChunkedArray:
    require_columns(source.table, [column], f"sampling.{name}")
    return source.table.column(column)


def _show(v: Any) -> str:
    return "null" if v is None else show(v) if isinstance(v, (str, list)) else repr(v)
