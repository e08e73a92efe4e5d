"""The Arrow type of a JSON schema's values (``output_json`` as a struct column) and what fits it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchrun.io.json_arrow import arrow_type, conforms

EXTRACT = {"type": "object", "additionalProperties": False, "required": ["product", "sentiment"],
           "properties": {"product": {"type": "string", "maxLength": 40},
                          "sentiment": {"enum": ["positive", "negative"]},
                          "score": {"type": "integer"}, "weight": {"type": "number"}, "ok": {"type": "boolean"},
                          "complaints": {"type": "array", "items": {"type": "string"}},
                          "seller": {"type": "object", "additionalProperties": False,
                                     "properties": {"name": {"type": "string"}}}}}


def test_a_fixed_object_schema_maps_to_a_struct():
    assert arrow_type(EXTRACT) == pa.struct([
        ("product", pa.string()), ("sentiment", pa.string()), ("score", pa.int64()), ("weight", pa.float64()),
        ("ok", pa.bool_()), ("complaints", pa.list_(pa.string())), ("seller", pa.struct([("name", pa.string())]))])


@pytest.mark.parametrize("schema", [
    {"type": "string"},  # not an object at the top
    {"type": "object", "properties": {"a": {"type": "string"}}},  # more properties allowed
    {"type": "object", "additionalProperties": False, "properties": {"a": {"anyOf": [{"type": "string"}]}}},
    {"type": "object", "additionalProperties": False, "properties": {"a": {"enum": ["x", 1]}}},
    {"type": "object", "additionalProperties": False, "properties": {"a": {"type": ["string", "null"]}}},
    {"type": "object", "additionalProperties": False, "properties": {"a": {"$ref": "#/$defs/x"}}},
    {"type": "object", "additionalProperties": False, "properties": {}},
    True,
])
def test_schemas_that_fix_no_type_stay_json_text(schema):
    assert arrow_type(schema) is None


def test_values_that_fit_and_values_that_do_not():
    t = arrow_type(EXTRACT)
    ok = {"product": "lamp", "sentiment": "positive", "score": 3, "weight": 1, "complaints": ["a"],
          "seller": {"name": "x"}}
    assert conforms(ok, t) and conforms({"product": "lamp"}, t)
    assert pa.array([ok], type=t).to_pylist()[0]["score"] == 3
    for bad in ({"score": 2**63}, {"score": True}, {"ok": 1}, {"complaints": "a"}, {"extra": 1}, [1]):
        assert not conforms(bad, t), bad
