"""The Arrow type of a JSON schema's values, where the schema fixes one: so that ``output_json`` can be a struct
column analysts query directly (``output_json.sentiment``) instead of JSON text.

A schema maps when it is an object whose properties are all known (``additionalProperties: false``) and every
property maps: strings (and string enums) to string, integers to int64, numbers to float64, booleans to bool,
arrays of a mapped item to lists, nested fixed objects to structs. Anything else (unions, ``$ref``, free-form
objects, mixed enums, ...) does not map, and the column stays JSON text. ``conforms`` checks a parsed value
fits the type (an integer beyond int64, say, does not).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def arrow_type(schema: Any) -> pa.DataType | None:
    """The Arrow type of ``schema``'s values, or None if it does not fix one. The top level must be an
    object (a struct)."""
    t = _type(schema)
    return t if t is not None and pa.types.is_struct(t) else None


def _type(schema: Any) -> pa.DataType | None:
    if not isinstance(schema, dict):
        return None
    if "enum" in schema:
        values = schema["enum"]
        return pa.string() if values and all(isinstance(v, str) for v in values) else None
    kind = schema.get("type")
    if not isinstance(kind, str):  # (a list of types is a union)
        return None
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        item = _type(schema.get("items"))
        return pa.list_(item) if item is not None else None
    if kind == "object":
        props = schema.get("properties")
        if schema.get("additionalProperties") is not False or not isinstance(props, dict) or not props:
            return None
        fields = [(name, _type(sub)) for name, sub in props.items()]
        if any(t is None for _, t in fields):
            return None
        return pa.struct([pa.field(name, t) for name, t in fields])
    return None


def conforms(value: Any, t: pa.DataType) -> bool:
    """Can ``value`` (parsed JSON) be stored as ``t``? (Missing object keys and nulls are allowed.)"""
    if value is None:
        return True
    if pa.types.is_struct(t):
        return isinstance(value, dict) and set(value) <= {f.name for f in t} and all(
            conforms(value.get(f.name), f.type) for f in t)
    if pa.types.is_list(t):
        return isinstance(value, list) and all(conforms(v, t.value_type) for v in value)
    if pa.types.is_boolean(t):
        return isinstance(value, bool)
    if pa.types.is_int64(t):
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if pa.types.is_float64(t):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)
