"""Rows to prompts to token ids.

A prompt is a Jinja template rendered in a sandbox (no file access, no imports, no calls to arbitrary
Python: only the row's values and Jinja's own filters). Each column is a variable; ``row`` holds them all
(for names that are not identifiers). With ``chat`` the tokenizer's chat template wraps the optional system
prompt, the few-shot turns and the rendered user message. A row whose template fails, that would print a
null value, whose value cannot be converted to Python, or whose prompt renders empty gets a per-row error
instead of failing the job (a null in a test such as ``{% if note %}`` is fine).

Template work is bounded (``TemplateLimitError``, a per-row error): a row's rendering may take RENDER_SECONDS,
print MAX_CHARS characters, and build no string, list or dict over MAX_CHARS characters or items, and no
integer over MAX_INT_BITS bits. The checks sit in the sandbox's hooks (operators, calls, filters, loops,
literals, output), not in a signal, so rendering may run in any thread. A template that goes
past a limit whatever the row (one that uses no column, or fails the same way on each of the first rows) is a
spec error (exit 78) instead.
This module knows the tokenizer's interface, not the model.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from string import Formatter
from typing import Any

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from batchrun.errors import InputDataError, SpecError
from batchrun.io.source import require_columns
from batchrun.spec import PromptSpec
from batchrun.tokens import TokenTable

MAX_CHARS = 4_000_000  # a rendered template, and any value a template builds (characters or items)
MAX_INT_BITS = 16_384  # integers a template computes (Python prints at most 4,300 digits anyway)
MAX_COUNT = 100_000  # counts a filter loops over in Python (batch, slice), like Jinja's own range() cap
MAX_WIDTH = 100_000  # a width or precision in % or str.format formatting
RENDER_SECONDS = 2.0  # per row: the user template and the system prompt together
_SAME_FAILURE_ROWS = 3  # the first rows all going past a limit the same way: the template is at fault, exit 78


class TemplateLimitError(Exception):
    """A template went past one of batchrun's limits (time, output size, value size, integer size)."""


class _NullRendered(Exception):
    """A template printed a null value (``{{ x }}`` with x null); tests like ``{% if x %}`` are fine."""


# ---------------------------------------------------------------------------------------------- limits

_state = threading.local()  # .deadline: the monotonic time the current row's rendering must end by


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than {RENDER_SECONDS:g} s")


def _too_big(what: str) -> TemplateLimitError:
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


def _measure(value: Any, limit: int = MAX_CHARS) -> int:
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
            _tick()
    return sizes[id(value)]


class _BoundedIter:
    """An iterator that checks the row's deadline at every item (for loops, lazy filter results) and, when
    ``sized``, that the items it has given total at most MAX_CHARS."""

    def __init__(self, iterable: Any, sized: bool):
        self._it, self._sized, self._size = iter(iterable), sized, 0

    def __iter__(self) -> _BoundedIter:
        return self

    def __next__(self) -> Any:
        _tick()
        item = next(self._it)
        if self._sized:
            self._size += _measure(item)
            if self._size > MAX_CHARS:
                raise _too_big("a sequence")
        return item


def _bounded(value: Any) -> Any:
    """``value`` if it is within the limits (a lazy sequence is wrapped to be checked as it is consumed)."""
    if isinstance(value, (str, bytes)):
        if len(value) > MAX_CHARS:
            raise _too_big("a string")
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"an integer would be over {MAX_INT_BITS:,} bits")
    elif isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
        if _measure(value) > MAX_CHARS:
            raise _too_big("a value")
    elif isinstance(value, Iterator) and not isinstance(value, _BoundedIter):
        return _BoundedIter(value, sized=True)
    return value


def _join(pieces: Any, sep: str = "") -> str:
    """``sep.join`` over the pieces' strings, refused before it allocates more than MAX_CHARS."""
    out, total = [], 0
    for piece in pieces:
        text = piece if isinstance(piece, str) else str(piece)
        total += len(text) + (len(sep) if out else 0)
        if total > MAX_CHARS:
            raise _too_big("the rendered (or joined) text")
        out.append(text)
    return sep.join(out)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_widths(numbers: list[str]) -> None:
    for n in numbers:
        if n == "*" or "{" in n:
            raise TemplateLimitError("a width or precision taken from an argument ('*' or a nested {field}) "
                                     "is not allowed")
        if n and int(n) > MAX_WIDTH:
            raise TemplateLimitError(f"a format width or precision over {MAX_WIDTH:,}")


def _check_percent_format(fmt: Any) -> None:
    if isinstance(fmt, str):
        _check_widths([n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n])


def _check_brace_format(fmt: str) -> None:
    try:
        specs = [spec for _, _, spec, _ in Formatter().parse(fmt) if spec]
    except ValueError:
        return  # the real call reports the malformed format string
    _check_widths([n for spec in specs for n in (["{"] if "{" in spec else re.findall(r"\d+", spec))])


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    n = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _check_binop(op: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**" and ints and right > 0 and abs(left) > 1:
        if right * math.log2(abs(left)) > MAX_INT_BITS:
            raise TemplateLimitError(f"{left} ** {right} would be over {MAX_INT_BITS:,} bits")
    elif op == "*" and ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise TemplateLimitError(f"an integer product would be over {MAX_INT_BITS:,} bits")
    elif op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if (isinstance(n, int) and n > 0 and isinstance(seq, (str, bytes, list, tuple))
                and _measure(seq, MAX_CHARS // n + 1) * n > MAX_CHARS):
            raise _too_big(f"repeating a {type(seq).__name__} {n} times")
    elif op == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
        if _measure(left) + _measure(right) > MAX_CHARS:
            raise _too_big("a concatenation")
    elif op == "%":
        _check_percent_format(left)


def _check_call(obj: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """Refuse a method call that would build a value past the limits before it runs (str.center(10**9),
    str.replace, str.join, str.format widths, int.to_bytes). Returns the callable and its (maybe
    materialised) positional arguments."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format / format_map
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if isinstance(owner, (str, bytes)):
        width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 8))
        if name in ("center", "ljust", "rjust", "zfill") and isinstance(width, int) and width > MAX_CHARS:
            raise _too_big(f"str.{name}({width})")
        if name == "expandtabs" and isinstance(width, int) and len(owner) + owner.count("\t") * width > MAX_CHARS:
            raise _too_big("str.expandtabs()")
        if name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)):
            count = args[2] if len(args) > 2 else kwargs.get("count")
            if _replaced_size(owner, args[0], args[1], count) > MAX_CHARS:
                raise _too_big("str.replace()")
        if name == "join" and args and isinstance(owner, str):
            items = list(_BoundedIter(args[0], sized=True))
            _join(items, owner)  # refuses before allocating
            args = (items, *args[1:])
        if name in ("format", "format_map") and isinstance(owner, str):
            _check_brace_format(owner)
        if name == "translate" and args and isinstance(args[0], dict):
            longest = max((_measure(v) for v in args[0].values()), default=1)
            if len(owner) * max(longest, 1) > MAX_CHARS:
                raise _too_big("str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if isinstance(length, int) and length > MAX_CHARS:
            raise _too_big(f"int.to_bytes({length})")
    return obj, args


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _pre_center(value: Any, args: tuple, kwargs: dict) -> Any:
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int) and width > MAX_CHARS:
        raise _too_big("center()")
    return value


def _pre_indent(value: Any, args: tuple, kwargs: dict) -> Any:
    width = _arg(args, kwargs, 0, "width", 4)
    per_line = width if isinstance(width, int) else len(str(width))
    if isinstance(value, str) and len(value) + (value.count("\n") + 1) * per_line > MAX_CHARS:
        raise _too_big("indent()")
    return value


def _pre_wordwrap(value: Any, args: tuple, kwargs: dict) -> Any:
    width, wrap = _arg(args, kwargs, 0, "width", 79), _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    if isinstance(value, str):
        lines = len(value) // max(width, 1) + value.count("\n") + 1 if isinstance(width, int) else len(value)
        if len(value) + lines * len(str(wrap)) > MAX_CHARS:
            raise _too_big("wordwrap()")
    return value


def _pre_replace(value: Any, args: tuple, kwargs: dict) -> Any:
    old, new = _arg(args, kwargs, 0, "old", None), _arg(args, kwargs, 1, "new", None)
    count = _arg(args, kwargs, 2, "count", None)
    if isinstance(old, str) and isinstance(new, str) and _replaced_size(str(value), old, new, count) > MAX_CHARS:
        raise _too_big("replace()")
    return value


def _pre_format(value: Any, args: tuple, kwargs: dict) -> Any:
    _check_percent_format(value)
    return value


def _pre_count(key: str) -> Any:
    def check(value: Any, args: tuple, kwargs: dict) -> Any:
        n = _arg(args, kwargs, 0, key, 1)
        if isinstance(n, int) and n > MAX_COUNT:
            raise TemplateLimitError(f"{key} over {MAX_COUNT:,}")
        return value
    return check


def _pre_tojson(value: Any, args: tuple, kwargs: dict) -> Any:
    indent = _arg(args, kwargs, 0, "indent", None)
    if (len(indent) if isinstance(indent, str) else indent or 0) > 16:
        raise TemplateLimitError("tojson() indent over 16")
    return value


def _pre_join(value: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(value, str):
        return value
    items = list(_BoundedIter(value, sized=True))
    sep = _arg(args, kwargs, 0, "d", "")
    if _arg(args, kwargs, 1, "attribute", None) is None:
        _join(items, sep if isinstance(sep, str) else str(sep))  # refuses before the real join allocates
    return items


# Filters whose output can be far larger than their input: checked before they run.
_FILTER_PRECHECKS = {"center": _pre_center, "indent": _pre_indent, "wordwrap": _pre_wordwrap,
                     "replace": _pre_replace, "format": _pre_format, "batch": _pre_count("linecount"),
                     "slice": _pre_count("slices"), "tojson": _pre_tojson, "join": _pre_join}


def _guard_filter(name: str, func: Any) -> Any:
    """``func`` with the limits around it. The wrapper takes the context (it passes the original what it asks
    for), which also keeps Jinja from running filters at compile time (constant folding)."""
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)
    pre = _FILTER_PRECHECKS.get(name)

    @pass_context
    def guarded(context: Any, value: Any = None, *args: Any, **kwargs: Any) -> Any:
        _tick()
        if pre is not None:
            value = pre(value, args, kwargs)
        if passes is None:
            return _bounded(func(value, *args, **kwargs))
        first = (context if passes == "context" else context.eval_ctx if passes == "eval_context"
                 else context.environment)
        return _bounded(func(first, value, *args, **kwargs))

    return guarded


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if not (isinstance(n, int) and isinstance(max, int) and n <= 100 and max <= 1000):
        raise TemplateLimitError("lipsum() takes at most n=100 paragraphs of at most max=1000 words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _Bounder(NodeTransformer):
    """Rewrites a template before it is compiled: every for loop iterates through ``_bounded_iter`` (the
    deadline is checked at every item), every list/tuple/dict literal goes through ``_bounded_value`` and
    every ``~`` through ``_bounded_concat``, so no value a template builds (by nesting a list in itself in a
    loop, say) grows past the limits unnoticed."""

    @staticmethod
    def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, "_bounded_iter")
        return node

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(node, "_bounded_value")

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), "_bounded_concat")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with batchrun's limits in its hooks (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_bounded_iter"] = pass_context(lambda _c, v: _BoundedIter(v, sized=False))
        self.filters["_bounded_value"] = pass_context(lambda _c, v: _bounded(v))
        self.filters["_bounded_concat"] = pass_context(lambda _c, v: _join(v))
        self.globals["lipsum"] = _lipsum
        self.concat = _join  # joins the output of macros, {% set %} blocks, {% filter %} blocks

    def _generate(self, source: nodes.Template, name: str | None, filename: str | None,
                  defer_init: bool = False) -> str:
        return super()._generate(_Bounder().visit(source), name, filename, defer_init)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        return _bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        __obj, args = _check_call(__obj, args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))



def _finalize(value: Any) -> Any:
    if value is None:
        raise _NullRendered()
    if isinstance(value, (list, tuple, dict, set, frozenset, Namespace)) and _measure(value) > MAX_CHARS:
        raise _too_big("a printed value")
    return value


_ENV = _BoundedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
                           finalize=_finalize)
_TOKENIZE_CHUNK = 2048


@dataclass(frozen=True)
class Prompts:
    """One entry per input row, in input order. ``error`` is set (and the row has no tokens) for failed rows."""

    texts: list[str | None]
    tokens: TokenTable
    errors: list[str | None]
    chat: bool

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens


def _templates(spec: PromptSpec) -> list[tuple[str, str]]:
    return [(name, text) for name, text in (("prompt.template", spec.template), ("prompt.system", spec.system))
            if text is not None]


def check_templates(spec: PromptSpec) -> None:
    """Compile every template of the prompt spec; raise SpecError listing syntax errors (exit 78), and
    templates that use no column yet go past a limit (they would on every row)."""
    problems = []
    for name, text in _templates(spec):
        try:
            _ENV.parse(text)
        except TemplateSyntaxError as e:
            problems.append(f"{name}: template syntax error at line {e.lineno}: {e.message}")
    if problems:
        raise SpecError("the prompt templates do not compile", problems)
    for name, text in _templates(spec):
        required, optional, _ = _columns_of(text)
        if not required | optional:
            try:
                _render_bounded(_ENV.from_string(text), {}, time.monotonic() + RENDER_SECONDS)
            except TemplateLimitError as e:
                problems.append(f"{name}: {e} (whatever the row)")
            except Exception:
                pass  # other failures depend on nothing here either, but stay per-row errors as before
    if problems:
        raise SpecError("the prompt templates go past batchrun's limits", problems)


def _render_bounded(template: Any, values: dict[str, Any], deadline: float) -> str:
    """Render with the row's deadline set (the output is joined by ``_join``: at most MAX_CHARS)."""
    _state.deadline = deadline
    try:
        return template.render(values)
    finally:
        _state.deadline = None


# ------------------------------------------------------------------------------------------ columns

_DICT_ATTRS = frozenset(dir(dict))


def _columns_of(text: str) -> tuple[set[str], set[str], set[str] | None]:
    """(required, optional, row keys) of one template. Required: names read from the row that the template
    never assigns. Optional: names it reads but also assigns somewhere ({% set %}, a loop variable, a macro,
    {% with %}, an import), which Jinja looks up in the row only on paths that skip the assignment: passed
    when the input has such a column, never required. Row keys: the columns ``row`` is used with (row.x,
    row["x"]), or None when ``row`` is used any other way (then it holds every column)."""
    ast = _ENV.parse(text)
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


def referenced_columns(spec: PromptSpec) -> set[str]:
    """The names the templates read from the row and never assign (a column each, or ``row``)."""
    return set().union(*(_columns_of(text)[0] for _, text in _templates(spec)))


class _Unconvertible:
    """A value of a used column that has no Python equivalent (a nanosecond timestamp without pandas, a date
    past year 9999): using it is a per-row error naming the column."""

    def __init__(self, reason: str):
        self.reason = reason


def column_values(table: pa.Table, name: str) -> list[Any]:
    """The column as Python values; a value that cannot convert becomes an ``_Unconvertible`` (only such
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
            out.append(_Unconvertible(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return out


def render(spec: PromptSpec, table: pa.Table) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Render each row: (user messages, system messages, errors). Only the columns the templates use are
    converted to Python."""
    check_templates(spec)
    required: set[str] = set()
    optional: set[str] = set()
    row_keys: set[str] | None = set()
    for _, text in _templates(spec):
        req, opt, keys = _columns_of(text)
        required, optional = required | req, optional | opt
        if "row" in req | opt:
            row_keys = None if keys is None or row_keys is None else row_keys | keys
    names = table.column_names
    uses_row = "row" in required | optional and "row" not in names
    require_columns(table, sorted(required - {"row"} if uses_row else required), "prompt.template")
    direct = sorted(c for c in required | optional if c in names)
    in_row = [] if not uses_row else names if row_keys is None else [c for c in names if c in row_keys]
    cols = list(dict.fromkeys([*direct, *in_row]))
    data = {c: column_values(table, c) for c in cols}
    template = _ENV.from_string(spec.template)
    system = _ENV.from_string(spec.system) if spec.system is not None else None
    users: list[str | None] = []
    systems: list[str | None] = []
    errors: list[str | None] = []
    limit_failures: list[str] = []
    for i in range(table.num_rows):
        values = {c: data[c][i] for c in cols}
        bad = [c for c in cols if isinstance(values[c], _Unconvertible)]
        if bad:
            users.append(None), systems.append(None)
            errors.append(f"column {bad[0]!r} has a value the template cannot use: {values[bad[0]].reason}")
            continue
        row_values = {c: values[c] for c in direct}
        if uses_row:
            row_values["row"] = {c: values[c] for c in in_row}
        field = "prompt.template"
        try:
            deadline = time.monotonic() + RENDER_SECONDS
            user = _render_bounded(template, row_values, deadline)
            field = "prompt.system"
            sys_text = _render_bounded(system, row_values, deadline) if system is not None else None
        except _NullRendered:
            nulls = [c for c in cols if values[c] is None]
            message = (f"column {nulls[0]!r} is null" if len(nulls) == 1 else
                       f"a null value would be rendered (null columns: {', '.join(map(repr, nulls))})")
            users.append(None), systems.append(None), errors.append(message)
            continue
        except Exception as e:  # a template error on one row must not fail the job
            if isinstance(e, TemplateLimitError) and len(limit_failures) == i:
                limit_failures.append(f"{field}: {e}")
                if i + 1 == _SAME_FAILURE_ROWS and len(set(limit_failures)) == 1:
                    raise SpecError(f"{field}: the template goes past batchrun's limits the same way on each of "
                                    f"the first {_SAME_FAILURE_ROWS} rows: {e}") from None
            users.append(None), systems.append(None), errors.append(f"template error: {type(e).__name__}: {e}")
            continue
        if not user.strip():
            users.append(None), systems.append(None), errors.append("prompt is empty after rendering")
            continue
        users.append(user), systems.append(sys_text), errors.append(None)
    return users, systems, errors


def use_chat(spec: PromptSpec, tokenizer: Any) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.chat is None:
        if spec.fewshot and not has_template:
            raise SpecError("prompt.fewshot: the model's tokenizer has no chat template; few-shot turns need one")
        return has_template
    if spec.chat and not has_template:
        raise SpecError("prompt.chat: true, but the model's tokenizer has no chat template; set chat: false")
    return spec.chat


def build_prompts(spec: PromptSpec, table: pa.Table, tokenizer: Any) -> Prompts:
    """Render, apply the chat template if any, and tokenize in batches with the fast tokenizer."""
    users, systems, errors = render(spec, table)
    chat = use_chat(spec, tokenizer)
    texts: list[str | None] = []
    for user, sys_text in zip(users, systems):
        if user is None:
            texts.append(None)
        elif chat:
            texts.append(_chat_text(tokenizer, spec, user, sys_text))
        else:
            texts.append(f"{sys_text}\n\n{user}" if sys_text else user)
    return Prompts(texts=texts, tokens=tokenize(tokenizer, texts, errors, add_special_tokens=not chat),
                   errors=errors, chat=chat)


def tokenize(tokenizer: Any, texts: list[str | None], errors: list[str | None] | None = None,
             add_special_tokens: bool = True) -> TokenTable:
    """Tokenize with the fast tokenizer in batches (its Rust core uses every CPU core) into a TokenTable.

    ``None`` texts get no tokens. A text that tokenizes to nothing is set to None, with an error in
    ``errors``. The chat template already writes special tokens, so chat prompts pass
    ``add_special_tokens=False``; a plain prompt gets the tokenizer's own (BOS).
    """
    parts = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        idx = [i for i in range(start, min(start + _TOKENIZE_CHUNK, len(texts))) if texts[i] is not None]
        rows: dict[int, list[int]] = {}
        if idx:
            enc = tokenizer([texts[i] for i in idx], add_special_tokens=add_special_tokens,
                            return_attention_mask=False)["input_ids"]
            rows = dict(zip(idx, enc))
        for i in idx:
            if not rows[i] and errors is not None:
                errors[i], texts[i] = "prompt is empty after tokenization", None
        end = min(start + _TOKENIZE_CHUNK, len(texts))
        parts.append(TokenTable.from_lists(rows.get(i, ()) for i in range(start, end)))
    return TokenTable.concat(parts)


def _chat_text(tokenizer: Any, spec: PromptSpec, user: str, system: str | None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    for shot in spec.fewshot:
        messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    messages.append({"role": "user", "content": user})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise InputDataError(f"prompt: the model's chat template failed: {e}") from None
