"""Reading a job file's YAML safely, applying ``--set`` overrides, and printing values from it boundedly.

Safe YAML only (no tags that build objects); a key given twice is an error; a document whose aliases would
expand past ``MAX_YAML_NODES`` values (a "billion laughs" bomb) or that refers to itself is refused before any
object is built. ``show`` prints a value for an error message without walking more of it than it prints (a
value built from aliases may be a small graph of exponential size). This module knows nothing about what a
job spec may contain: the fields and their validation are ``batchrun.spec``'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import yaml

from batchrun.errors import SpecError, UsageError

# A job file is small: these bound what loading one may cost (an alias "bomb" expands exponentially).
MAX_YAML_NODES = 100_000  # nodes after expanding aliases
MAX_YAML_DEPTH = 100


class _GuardedLoader(yaml.SafeLoader):
    """Safe YAML (no tags that build objects) that refuses a document whose aliases would expand past
    MAX_YAML_NODES nodes (a "billion laughs" bomb) or that refers to itself, before building any object."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


class _UniqueKeyLoader(_GuardedLoader):
    """The guarded safe loader that also refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes the document has with every alias expanded (each shared node once, by memo: linear in
    the document), and raise a YAML error past MAX_YAML_NODES or on an alias that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the document expands to more than {MAX_YAML_NODES:,} values through its aliases "
                    "(*name); a job spec needs far fewer", node.start_mark)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it",
                                                    node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def parse_yaml(text: str, source: str = "<spec>") -> dict[str, Any]:
    """The mapping a job file's text holds (guarded as above); SpecError (exit 78) names ``source``."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{source}: not valid YAML: nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec must be a YAML mapping (got {type(raw).__name__})")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` to the raw mapping; the value is read as YAML (``8``, ``true``, ``[a, b]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects FIELD=VALUE, e.g. sampling.max_tokens=16 (got {item!r})")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise UsageError(f"--set: malformed field path {key!r}")
    try:
        parsed = yaml.load(value, Loader=_GuardedLoader) if value.strip() else ""
    except (yaml.YAMLError, RecursionError):
        parsed = value
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise UsageError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = parsed


# ------------------------------------------------------------------------------------- bounded printing


def show(v: Any, limit: int = 60) -> str:
    """A short rendering of a value for an error message (at most ``limit`` characters). It never expands
    more of ``v`` than it prints: a value built from YAML aliases may be a small graph of exponential size."""
    if isinstance(v, str):
        s = repr(v[: limit + 1])
    elif _small(v, limit):
        s = json.dumps(v, default=str)
    else:
        s = ""
        for piece in _json_pieces(v):
            s += piece
            if len(s) > limit:
                break
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _small(v: Any, budget: int) -> bool:
    """Whether ``v`` has at most ``budget`` values and characters in all (a bounded walk)."""
    stack = [v]
    while stack:
        x = stack.pop()
        budget -= 1 + (len(x) if isinstance(x, str) else 0)
        if budget < 0:
            return False
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()][: budget + 1]
        elif isinstance(x, (list, tuple)):
            stack += list(x[: budget + 1])
    return True


def _json_pieces(v: Any) -> Iterator[str]:
    """JSON text of ``v`` piece by piece, so a caller can stop early."""
    if isinstance(v, dict):
        yield "{"
        for i, (k, x) in enumerate(v.items()):
            yield (", " if i else "") + json.dumps(k if isinstance(k, str) else str(k)[:100]) + ": "
            yield from _json_pieces(x)
        yield "}"
    elif isinstance(v, (list, tuple)):
        yield "["
        for i, x in enumerate(v):
            if i:
                yield ", "
            yield from _json_pieces(x)
        yield "]"
    else:
        yield json.dumps(v[:100] if isinstance(v, str) else v, default=lambda o: str(o)[:100])
