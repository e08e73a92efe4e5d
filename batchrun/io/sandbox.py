"""Jinja's immutable sandbox (no file access, no imports, no calls to arbitrary Python) with bounds on the work
a template does.

The limits are ``batchrun.io.template_limits``'s: under ``time_limit(seconds)`` a render may take that long; any
render may print MAX_CHARS characters and build no string, list or dict over MAX_CHARS characters or items, and
no integer over MAX_INT_BITS bits. Past a limit it raises ``TemplateLimitError``. The checks sit in the
environment's hooks (operators, calls, filters; loops, literals and ``~`` through a rewrite of the template's AST;
output through ``concat`` and ``check_printed``), not in a signal, so rendering may run in any thread; an
operation whose result would be past a limit (``"x" * 10**9``, ``center(10**9)``, a format width) is refused
before it runs.
This module knows Jinja and Python values, not rows, columns, prompt specs or what a failure means for a job.
"""

from __future__ import annotations

import math
import re
from string import Formatter
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from batchrun.io.template_limits import (
    MAX_CHARS,
    MAX_COUNT,
    MAX_INT_BITS,
    MAX_WIDTH,
    BoundedIter,
    TemplateLimitError,
    bounded,
    bounded_join,
    measure,
    tick,
    too_big,
)

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
                and measure(seq, MAX_CHARS // n + 1) * n > MAX_CHARS):
            raise too_big(f"repeating a {type(seq).__name__} {n} times")
    elif op == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
        if measure(left) + measure(right) > MAX_CHARS:
            raise too_big("a concatenation")
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
            raise too_big(f"str.{name}({width})")
        if name == "expandtabs" and isinstance(width, int) and len(owner) + owner.count("\t") * width > MAX_CHARS:
            raise too_big("str.expandtabs()")
        if name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)):
            count = args[2] if len(args) > 2 else kwargs.get("count")
            if _replaced_size(owner, args[0], args[1], count) > MAX_CHARS:
                raise too_big("str.replace()")
        if name == "join" and args and isinstance(owner, str):
            items = list(BoundedIter(args[0], sized=True))
            bounded_join(items, owner)  # refuses before allocating
            args = (items, *args[1:])
        if name in ("format", "format_map") and isinstance(owner, str):
            _check_brace_format(owner)
        if name == "translate" and args and isinstance(args[0], dict):
            longest = max((measure(v) for v in args[0].values()), default=1)
            if len(owner) * max(longest, 1) > MAX_CHARS:
                raise too_big("str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        if isinstance(length, int) and length > MAX_CHARS:
            raise too_big(f"int.to_bytes({length})")
    return obj, args


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _pre_center(value: Any, args: tuple, kwargs: dict) -> Any:
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int) and width > MAX_CHARS:
        raise too_big("center()")
    return value


def _pre_indent(value: Any, args: tuple, kwargs: dict) -> Any:
    width = _arg(args, kwargs, 0, "width", 4)
    per_line = width if isinstance(width, int) else len(str(width))
    if isinstance(value, str) and len(value) + (value.count("\n") + 1) * per_line > MAX_CHARS:
        raise too_big("indent()")
    return value


def _pre_wordwrap(value: Any, args: tuple, kwargs: dict) -> Any:
    width, wrap = _arg(args, kwargs, 0, "width", 79), _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    if isinstance(value, str):
        lines = len(value) // max(width, 1) + value.count("\n") + 1 if isinstance(width, int) else len(value)
        if len(value) + lines * len(str(wrap)) > MAX_CHARS:
            raise too_big("wordwrap()")
    return value


def _pre_replace(value: Any, args: tuple, kwargs: dict) -> Any:
    old, new = _arg(args, kwargs, 0, "old", None), _arg(args, kwargs, 1, "new", None)
    count = _arg(args, kwargs, 2, "count", None)
    if isinstance(old, str) and isinstance(new, str) and _replaced_size(str(value), old, new, count) > MAX_CHARS:
        raise too_big("replace()")
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
    items = list(BoundedIter(value, sized=True))
    sep = _arg(args, kwargs, 0, "d", "")
    if _arg(args, kwargs, 1, "attribute", None) is None:
        bounded_join(items, sep if isinstance(sep, str) else str(sep))  # refuses before the real join allocates
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
        tick()
        if pre is not None:
            value = pre(value, args, kwargs)
        if passes is None:
            return bounded(func(value, *args, **kwargs))
        first = (context if passes == "context" else context.eval_ctx if passes == "eval_context"
                 else context.environment)
        return bounded(func(first, value, *args, **kwargs))

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


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with batchrun's limits in its hooks (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_bounded_iter"] = pass_context(lambda _c, v: BoundedIter(v, sized=False))
        self.filters["_bounded_value"] = pass_context(lambda _c, v: bounded(v))
        self.filters["_bounded_concat"] = pass_context(lambda _c, v: bounded_join(v))
        self.globals["lipsum"] = _lipsum
        self.concat = bounded_join  # joins the output of macros, {% set %} blocks, {% filter %} blocks

    def _generate(self, source: nodes.Template, name: str | None, filename: str | None,
                  defer_init: bool = False) -> str:
        return super()._generate(_Bounder().visit(source), name, filename, defer_init)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        tick()
        _check_binop(operator, left, right)
        return bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        tick()
        __obj, args = _check_call(__obj, args, kwargs)
        return bounded(super().call(__context, __obj, *args, **kwargs))


def check_printed(value: Any) -> Any:
    """``value`` if printing it stays within the limits (for an environment's ``finalize``)."""
    if isinstance(value, (list, tuple, dict, set, frozenset, Namespace)) and measure(value) > MAX_CHARS:
        raise too_big("a printed value")
    return value
