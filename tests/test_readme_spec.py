"""README.md's job spec reference documents every field of ``JobSpec`` (recursively), and only real ones."""

from __future__ import annotations

import re
import types
import typing

import yaml
from pydantic import BaseModel, Field

from batchrun.spec import JobSpec, SamplingSpec, validate_dict
from helpers import REPO


def _spec_references() -> list[str]:
    """The YAML blocks of README.md's "## Job spec reference" section (the whole spec, then the fields of
    ``mode: batchprompt`` in a spec of their own)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "\n## Job spec reference\n" in readme
    section = readme.split("\n## Job spec reference\n", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^```yaml\n(.*?)^```", section, re.S | re.M)
    assert found, "the spec reference has no ```yaml block"
    return [found[0], *(b for b in found[1:] if b.startswith("name:") and "\nmode: batchprompt" in b)]


def _spec_reference() -> str:
    return _spec_references()[0]


def _shape(annotation) -> tuple[str, type[BaseModel] | None]:
    """("section", M) for a model M (or M | None), ("list", M) for list[M] (or | None), ("leaf", None) for a field
    holding no model. Any other way of nesting a model needs this test extended."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section", annotation
    if typing.get_origin(annotation) is list and _shape(args[0])[0] == "section":
        return "list", args[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _shape(args[0])
    inner = [a for a in args if _shape(a)[0] != "leaf"]
    assert not inner, f"{annotation}: a model nested this way is not checked against the README; extend _shape"
    return "leaf", None


def _undocumented(model: type[BaseModel], node: yaml.MappingNode, value: dict, lines: list[str],
                  path: str = "") -> list[str]:
    """Every field of ``model`` (recursively) that the README's YAML mapping ``node`` does not document: the key
    must be there, a field that is not a section needs a ``# comment`` on its line, and the comment must say
    ``required`` for a required field, and ``default:`` unless the example value is the default."""
    keys = {k.value: (k, v) for k, v in node.value}
    problems = []
    for name, field in model.model_fields.items():
        dotted = path + name
        if name not in keys:
            problems.append(f"{dotted}: missing")
            continue
        key_node, value_node = keys[name]
        shape, sub = _shape(field.annotation)
        if shape == "section":
            if not isinstance(value_node, yaml.MappingNode):
                problems.append(f"{dotted}: should be a mapping of its fields")
            else:
                problems += _undocumented(sub, value_node, value[name], lines, dotted + ".")
            continue
        line, end = key_node.start_mark.line, value_node.end_mark
        rest = lines[line][end.column if end.line == line else key_node.end_mark.column:]
        comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
        if not comment:
            problems.append(f"{dotted}: no comment saying what it does")
        elif field.is_required():
            if "required" not in comment and "default:" not in comment:
                problems.append(f"{dotted}: its comment does not say it is required")
        elif value[name] != field.get_default(call_default_factory=True) and "default:" not in comment:
            problems.append(f"{dotted}: the example is not the default and the comment does not give it")
        if shape == "list":
            items = value_node.value if isinstance(value_node, yaml.SequenceNode) else []
            if not items or not all(isinstance(i, yaml.MappingNode) for i in items):
                problems.append(f"{dotted}: should show an item with its fields")
            for item, item_value in zip(items, value[name] or []):
                if isinstance(item, yaml.MappingNode):
                    problems += _undocumented(sub, item, item_value, lines, dotted + "[].")
    return problems


def test_readme_spec_reference_documents_every_field():
    """Each field is documented in one of the blocks (a field that one block leaves out, another shows)."""
    problems = [set(_undocumented(JobSpec, yaml.compose(b), yaml.safe_load(b), b.splitlines()))
                for b in _spec_references()]
    assert len(problems) == 2 and sorted(set.intersection(*problems)) == []


def test_readme_spec_reference_is_a_valid_spec():
    """No stale key (unknown keys are errors) and no invalid example value, in either block."""
    specs = [validate_dict(yaml.safe_load(b), source="README.md") for b in _spec_references()]
    assert specs[0].output.part_rows >= 1 and [s.mode for s in specs] == ["generate", "batchprompt"]


def test_readme_check_catches_an_undocumented_field():
    """The check above fails for a field, or a section, that the README does not show."""
    block = _spec_reference()
    node, value, lines = yaml.compose(block), yaml.safe_load(block), block.splitlines()

    class Extra(BaseModel):
        knob: int = 1

    class Sampling(SamplingSpec):
        new_knob: int = 3

    class Job(JobSpec):
        sampling: Sampling = Field(default_factory=Sampling)
        extra: Extra | None = None
        shots: list[Extra] = Field(default_factory=list)

    new = set(_undocumented(Job, node, value, lines)) - set(_undocumented(JobSpec, node, value, lines))
    assert new == {"sampling.new_knob: missing", "extra: missing", "shots: missing"}
