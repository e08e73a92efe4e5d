"""Which table columns a prompt's templates use, and those columns as Python values.

A template reads a column as a variable of its name, or through ``row`` (``row.x``, ``row["x"]``); only the
columns used are passed to it, and only those are converted to Python (a value that cannot convert fails its
own row, not the column).
This module knows Jinja's template AST and Arrow tables, not the sandbox, rendering or the prompt spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from jinja2 import meta, nodes

_DICT_ATTRS = frozenset(dir(dict))


def columns_of(ast: nodes.Template) -> tuple[set[str], set[str], set[str] | None]:
    """(required, optional, row keys) of one template. Required: names read from the row that the template
    never assigns. Optional: names it reads but also assigns somewhere ({% set %}, a loop variable, a macro,
    {% with %}, an import), which Jinja looks up in the row only on paths that skip the assignment: passed
    when the input has such a column, never required. Row keys: the columns ``row`` is used with (row.x,
    row["x"]), or None when ``row`` is used any other way (then it holds every column)."""
    undeclared = meta.find_undeclared_variables(ast)
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    assigned |= {n.name for n in ast.find_all(nodes.Macro)} | {n.target for n in ast.find_all(nodes.Import)}
    for imp in ast.find_all(nodes.FromImport):
        assigned |= {n[1] if isinstance(n, tuple) else n for n in imp.names}
    keys: set[str] | None = set()
    uses = sum(1 for n in ast.find_all(nodes.Name) if n.name == "row" and n.ctx == "load")
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        inner = node.node
        if not (isinstance(inner, nodes.Name) and inner.name == "row" and inner.ctx == "load"):
            continue
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(key, str) and not (isinstance(node, nodes.Getattr) and key in _DICT_ATTRS):
            keys.add(key)
            uses -= 1
    if uses > 0:
        keys = None
    return undeclared - assigned, undeclared & assigned, keys


@dataclass(frozen=True)
class ColumnScope:
    """The columns a row's rendering is given, for a table with given column names."""

    required: list[str]  # must be in the table
    direct: list[str]  # passed as variables of their own names
    in_row: list[str]  # passed inside ``row`` (empty when the templates do not use ``row`` or a column is so named)
    uses_row: bool  # ``row`` is passed

    @property
    def columns(self) -> list[str]:
        """Every column passed, each once: the ones to convert."""
        return list(dict.fromkeys([*self.direct, *self.in_row]))


def scope_columns(asts: list[nodes.Template], names: list[str]) -> ColumnScope:
    """The columns that templates ``asts`` (rendered together for each row) need from a table with columns
    ``names``: required ones, optional ones the table has, and ``row`` with only the keys it is used with."""
    required: set[str] = set()
    optional: set[str] = set()
    row_keys: set[str] | None = set()
    for ast in asts:
        req, opt, keys = columns_of(ast)
        required, optional = required | req, optional | opt
        if "row" in req | opt:
            row_keys = None if keys is None or row_keys is None else row_keys | keys
    uses_row = "row" in required | optional and "row" not in names
    direct = sorted(c for c in required | optional if c in names)
    in_row = [] if not uses_row else names if row_keys is None else [c for c in names if c in row_keys]
    return ColumnScope(required=sorted(required - {"row"} if uses_row else required), direct=direct,
                       in_row=list(in_row), uses_row=uses_row)


class Unconvertible:
    """A value of a used column that has no Python equivalent (a nanosecond timestamp without pandas, a date
    past year 9999): using it is a per-row error naming the column."""

    def __init__(self, reason: str):
        self.reason = reason


def column_values(table: pa.Table, name: str) -> list[Any]:
    """The column as Python values; a value that cannot convert becomes an ``Unconvertible`` (only such
    values fail, each on its own row)."""
    col = table.column(name)
    try:
        return col.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError, TypeError):
        pass
    out: list[Any] = []
    for i in range(len(col)):
        try:
            out.append(col[i].as_py())
        except (pa.ArrowException, ValueError, OverflowError, TypeError) as e:
            out.append(Unconvertible(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return out
