"""batchrun.spec_yaml through load_spec: YAML syntax and shape errors, duplicate keys, --set overrides, and
hostile YAML (alias bombs, recursion, deep nesting) refused quickly, without expanding anything."""

from __future__ import annotations

import re

import pytest

from batchrun.errors import SpecError, UsageError
from batchrun.spec import load_spec
from batchrun.spec_yaml import apply_override
from helpers import MINIMAL_SPEC as MINIMAL
from helpers import write_job


@pytest.mark.parametrize("body, expected", [
    ("model: [unclosed\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("a: b\n c: d\n", "not valid YAML at line 2, column 3: mapping values are not allowed here"),
    ("- a\n- b\n", "a job spec must be a YAML mapping (got list)"),
    ("just text\n", "a job spec must be a YAML mapping (got str)"),
])
def test_yaml_syntax_and_shape_errors(tmp_path, body, expected):
    path = write_job(tmp_path, body)
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    assert str(ei.value) == f"{path}: {expected}"
    assert ei.value.exit_code == 78 and ei.value.problems == []


def test_missing_job_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError) as ei:
        load_spec(tmp_path / "nope.yaml")
    assert str(ei.value) == f"job file not found: {tmp_path / 'nope.yaml'}" and ei.value.exit_code == 2


def test_set_overrides_int_string_list_and_nested_creation(tmp_path):
    spec = load_spec(write_job(tmp_path, MINIMAL), [
        "sampling.max_tokens=16", "model.path=other/model", "sampling.stop=[a, b]",
        "input.path=[x.parquet, y.parquet]", "engine.device=cpu", "prompt.template={{ text }}!"])
    assert spec.sampling.max_tokens == 16 and spec.sampling.stop == ["a", "b"]
    assert spec.model.path == "other/model" and spec.input.paths == ["x.parquet", "y.parquet"]
    assert spec.engine.device == "cpu" and spec.prompt.template == "{{ text }}!"


def test_apply_override_on_raw_mapping():
    raw: dict = {"sampling": None}
    for item in ("sampling.a.b=null", "x= 7 ", "y=a=b", "z="):
        apply_override(raw, item)
    assert raw == {"sampling": {"a": {"b": None}}, "x": 7, "y": "a=b", "z": ""}


@pytest.mark.parametrize("item, message", [
    ("novalue", "--set expects FIELD=VALUE, e.g. sampling.max_tokens=16 (got 'novalue')"),
    ("=5", "--set expects FIELD=VALUE, e.g. sampling.max_tokens=16 (got '=5')"),
    ("a..b=1", "--set: malformed field path 'a..b'"),
    ("model.path.x=1", "--set model.path.x: model.path is not a mapping"),
])
def test_malformed_set_is_usage_error(tmp_path, item, message):
    with pytest.raises(UsageError) as ei:
        load_spec(write_job(tmp_path, MINIMAL), [item])
    assert str(ei.value) == message and ei.value.exit_code == 2


def test_duplicate_yaml_key_is_an_error(tmp_path):
    body = MINIMAL + "sampling: {max_tokens: 4}\nsampling: {max_tokens: 8}\n"
    with pytest.raises(SpecError) as ei:
        load_spec(write_job(tmp_path, body))
    assert ei.value.message == (f"{tmp_path / 'job.yaml'}: not valid YAML at line 6, column 1: "
                                "key 'sampling' appears twice in one mapping")


# ------------------------------------------------------------------------------------ hostile YAML

def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("use", ["name: *l9\n", "prompt: {template: *l9}\n", "x: *l9\n", ""])
def test_alias_bomb_is_refused_quickly(tmp_path, use):
    """A billion-laughs document (9**10 values once expanded) is refused while loading, before any object is
    built and before any message prints a value, whatever field (or none) uses it."""
    body = _bomb() + use + MINIMAL.replace("prompt:", "prompt_:" if "prompt" in use else "prompt:")
    path = write_job(tmp_path, body.replace("prompt_:", "x_:"))
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    assert ei.value.exit_code == 78 and ei.value.problems == []
    assert re.fullmatch(rf"{re.escape(str(path))}: not valid YAML at line \d+, column \d+: the document expands to "
                        r"more than 100,000 values through its aliases \(\*name\); a job spec needs far fewer",
                        ei.value.message)


def test_recursive_alias_and_deep_nesting_are_spec_errors(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_spec(write_job(tmp_path, MINIMAL + "x: &a [1, *a]\n"))
    assert ei.value.message.endswith("an alias refers to a value that contains it")
    with pytest.raises(SpecError) as ei:
        load_spec(write_job(tmp_path, MINIMAL + "x: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert ei.value.message == f"{tmp_path / 'job.yaml'}: not valid YAML: nested too deeply"


def test_alias_bomb_in_set_is_not_expanded(tmp_path):
    """--set reads its value as YAML through the same guarded loader: a bomb is refused as YAML, so the value
    stays the plain text it was given."""
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "[" + ", ".join(levels) + "]"
    spec = load_spec(write_job(tmp_path, MINIMAL), [f"prompt.system={bomb}"])
    assert spec.prompt.system == bomb
