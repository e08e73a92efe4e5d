"""The job spec's error messages: a pydantic error as ``field.path: what is wrong (got X)``, with a hint where
a value is close to a valid one (YAML 1.1 reading ``1e-3`` as text, a field pattern's meaning, the fields
allowed where an unknown one is). ``batchrun.spec`` validates; this module only words the problems.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from batchrun.spec_yaml import show


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at ``loc`` (to list allowed keys for an unknown one)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model




_YAML11_FLOAT = re.compile(r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))[eE]([-+]?)([0-9]+)")


def number_hint(kind: str, got: Any) -> str:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as text: a number needs a dot and a signed exponent (``1.0e-3``)."""
    numeric = kind.split("_")[0] in ("int", "float")
    m = _YAML11_FLOAT.fullmatch(got.strip()) if numeric and isinstance(got, str) else None
    if not m:
        return ""
    mantissa = m.group(1) if "." in m.group(1) else m.group(1) + ".0"
    return f": YAML reads it as text; write {mantissa}e{m.group(2) or '+'}{m.group(3)}"


def describe(err: dict[str, Any], root: type[BaseModel], pattern_hints: dict[str, str]) -> str:
    """One pydantic error as ``field.path: what is wrong (got X)``; ``root``: the spec's model (to list the
    fields allowed where an unknown one is), ``pattern_hints``: what each field pattern means."""
    loc, kind, ctx, got = tuple(err["loc"]), err["type"], err.get("ctx") or {}, err.get("input")
    path = _loc(loc)
    if kind == "extra_forbidden":
        owner = _model_at(root, loc)
        allowed = ", ".join(owner.model_fields) if owner else "?"
        return f"{path}: unknown field (allowed here: {allowed})"
    if kind == "missing":
        return f"{path}: required"
    bounds = {"less_than_equal": "<=", "less_than": "<", "greater_than_equal": ">=", "greater_than": ">"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"{path}: must be {bounds[kind]} {limit} (got {show(got)})"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected')} (got {show(got)})"
    if kind == "string_pattern_mismatch":
        hint = pattern_hints.get(ctx.get("pattern"), f"must match {ctx.get('pattern')}")
        return f"{path}: {hint} (got {show(got)})"
    if kind == "invalid_key":
        return f"{_loc(loc[:-1])}: field names must be strings (got {show(loc[-1])})"
    if kind == "string_too_long":
        return f"{path}: at most {ctx.get('max_length')} characters"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "too_long":
        return f"{path}: at most {ctx.get('max_length')} items (got {ctx.get('actual_length')})"
    if kind == "value_error":
        return f"{path}: {ctx.get('error', err['msg'])!s}"
    types = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
        "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
        "model_type": "a mapping", "dict_type": "a mapping", "model_attributes_type": "a mapping",
    }
    if kind == "finite_number":
        return f"{path}: must be a finite number (got {show(got)})"
    if kind in types:
        return f"{path}: must be {types[kind]} (got {show(got)}{number_hint(kind, got)})"
    return f"{path}: {err['msg']} (got {show(got)})"
