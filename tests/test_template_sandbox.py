"""The template sandbox (batchrun.io.sandbox and template_limits, through batchrun.io.prompts): escapes become row
errors, unknown globals are missing columns, and the limits on size, growth and time fail a row, or the job when
every row would (at validate when no column is used), quickly and without signals."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from batchrun.errors import InputDataError, SpecError
from batchrun.io import prompts
from batchrun.io.prompts import check_templates
from batchrun.spec import PromptSpec
from helpers import rendered

# -------------------------------------------------------------------------------------------- sandbox

SECRETS = ("root:", "__builtins__", "os.path", "<module", "_io.", "subprocess")


def unsafe(attr: str, owner: str) -> str:
    return f"template error: SecurityError: access to attribute '{attr}' of '{owner}' object is unsafe."


NO_LOADER = "template error: TypeError: no loader for this environment specified"


@pytest.mark.parametrize("template, error", [
    ("{{ ''.__class__.__mro__ }}", unsafe("__class__", "str")),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", unsafe("__class__", "str")),
    ("{{ n.__class__.__base__.__subclasses__() }}", unsafe("__class__", "int")),
    ("{{ text|attr('__class__') }}", unsafe("__class__", "str")),
    ("{{ '{0.__class__}'.format(text) }}", unsafe("__class__", "str")),
    ("{{ cycler.__init__.__globals__ }}", unsafe("__init__", "type")),
    ("{{ joiner.__init__.__globals__ }}", unsafe("__init__", "type")),
    ("{{ namespace.__init__.__globals__ }}", unsafe("__init__", "type")),
    ("{{ lipsum.__globals__ }}", unsafe("__globals__", "function")),
    ("{{ self.__init__.__globals__ }}", unsafe("__init__", "TemplateReference")),
    ("{{ row.__class__ }}", unsafe("__class__", "dict")),
    ("{{ row.clear() }}", unsafe("clear", "dict")),
    ("{% include '/etc/passwd' %}", NO_LOADER),
    ("{% extends '/etc/passwd' %}", NO_LOADER),
    ("{% import 'os' as os %}", NO_LOADER),
])
def test_sandbox_escapes_become_row_errors(template, error):
    table = pa.table({"text": ["hi"], "n": [1]})
    users, systems, errors = rendered(template, table)
    assert (users, systems, errors) == ([None], [None], [error])


def test_sandbox_harmless_globals_render_without_secrets():
    table = pa.table({"text": ["hi"]})
    template = "{{ self }}|{{ lipsum(1, html=False)[:0] }}|{{ range(2)|list }}|{{ text }}"
    users, _, errors = rendered(template, table)
    assert errors == [None] and users == ["<TemplateReference None>||[0, 1]|hi"]
    assert not any(s in users[0] for s in SECRETS)


@pytest.mark.parametrize("name", ["config", "request", "os", "__builtins__"])
def test_unknown_globals_are_treated_as_missing_columns(name):
    with pytest.raises(InputDataError) as ei:
        rendered("{{ %s }}" % name, pa.table({"text": ["hi"]}))
    assert str(ei.value) == f"prompt.template: the input has no column '{name}' (columns: text)"


# --------------------------------------------------------------------------------------------- limits

LIMIT = "template error: TemplateLimitError: "
TOO_BIG = "would be over 4,000,000 characters or items"


@pytest.mark.parametrize("template, problem", [
    ("{{ 7 ** 300000000 }}", "7 ** 300000000 would be over 16,384 bits"),
    ("{{ lipsum(n=10**7) }}", "lipsum() takes at most n=100 paragraphs of at most max=1000 words"),
    ("{{ 'a' * 10**9 }}", f"repeating a str 1000000000 times {TOO_BIG}"),
    ("{{ [1] * 10**9 }}", f"repeating a list 1000000000 times {TOO_BIG}"),
    ("{{ 'a'|center(10**9) }}", f"center() {TOO_BIG}"),
    ("{{ 'a'.ljust(10**9) }}", f"str.ljust(1000000000) {TOO_BIG}"),
    ("{{ '%999999999d'|format(1) }}", "a format width or precision over 100,000"),
    ("{{ '%*d' % (10**9, 1) }}",
     "a width or precision taken from an argument ('*' or a nested {field}) is not allowed"),
    ("{{ '{:>999999999}'.format(1) }}", "a format width or precision over 100,000"),
    ("{{ ('ab' * 1000000)|replace('', 'xxxxxxxx') }}", f"replace() {TOO_BIG}"),
    ("{{ (1).to_bytes(10**9, 'big') }}", f"int.to_bytes(1000000000) {TOO_BIG}"),
    ("{{ range(10)|batch(10**9, 'x')|list }}", "linecount over 100,000"),
    ("{% set x %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endset %}{{ x|length }}",
     f"the rendered (or joined) text {TOO_BIG}"),
])
def test_row_independent_limits_fail_validation(template, problem):
    """A template that uses no column and goes past a limit would on every row: exit 78 at validate."""
    start = time.monotonic()
    with pytest.raises(SpecError) as ei:
        check_templates(PromptSpec(template=template))
    assert ei.value.exit_code == 78 and ei.value.message == "the prompt templates go past batchrun's limits"
    assert ei.value.problems == [f"prompt.template: {problem} (whatever the row)"]
    assert time.monotonic() - start < 2


def test_limits_in_the_system_prompt_are_named():
    with pytest.raises(SpecError) as ei:
        check_templates(PromptSpec(template="{{ text }}", system="{{ 9 ** (9 ** 9) }}"))
    assert ei.value.problems == ["prompt.system: 9 ** 387420489 would be over 16,384 bits (whatever the row)"]


def test_a_limit_hit_the_same_way_on_the_first_rows_fails_the_job():
    table = pa.table({"text": ["a", "b", "c", "d"]})
    start = time.monotonic()
    with pytest.raises(SpecError) as ei:
        rendered("{{ text }}{{ 7 ** 300000000 }}", table)
    assert str(ei.value) == ("prompt.template: the template goes past batchrun's limits the same way on each of "
                             "the first 3 rows: 7 ** 300000000 would be over 16,384 bits")
    with pytest.raises(SpecError) as ei:
        rendered("{{ text }}", table, system="{{ text * 10**9 }}")
    assert str(ei.value).startswith("prompt.system: the template goes past batchrun's limits the same way")
    assert time.monotonic() - start < 2


def test_row_dependent_limits_are_row_errors():
    table = pa.table({"text": ["a", "b", "c", "d"], "n": [1, 10**9, 2, 10**8]})
    users, _, errors = rendered("{{ text * n }}", table)
    assert users == ["a", None, "cc", None]
    assert errors == [None, f"{LIMIT}repeating a str 1000000000 times {TOO_BIG}", None,
                      f"{LIMIT}repeating a str 100000000 times {TOO_BIG}"]


def test_rendered_text_is_capped_per_row():
    table = pa.table({"text": ["short", "x" * 4_000_001, "also short"]})
    users, _, errors = rendered("{{ text }}", table)
    assert users == ["short", None, "also short"]
    assert errors[1] == f"{LIMIT}the rendered (or joined) text {TOO_BIG}"


def test_time_limit_per_row_without_signals(monkeypatch):
    """A row whose rendering runs past RENDER_SECONDS is a row error; checked at every loop item and call,
    not by SIGALRM, so it also holds when rendering runs in a thread."""
    monkeypatch.setattr(prompts, "RENDER_SECONDS", 0.3)
    table = pa.table({"text": ["a", "b", "c"], "n": [2, 100000, 3]})
    loops = "{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}{{ text }}"
    result: list = []
    worker = threading.Thread(target=lambda: result.append(rendered(loops, table)))
    start = time.monotonic()
    worker.start()
    worker.join(30)
    assert time.monotonic() - start < 5
    users, _, errors = result[0]
    assert users == ["a", None, "c"]
    assert errors == [None, f"{LIMIT}rendering took longer than 0.3 s", None]


def test_time_limit_on_every_row_fails_the_job_after_three_rows(monkeypatch):
    monkeypatch.setattr(prompts, "RENDER_SECONDS", 0.2)
    table = pa.table({"text": [str(i) for i in range(1000)]})
    start = time.monotonic()
    with pytest.raises(SpecError) as ei:
        rendered("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ text }}", table)
    assert str(ei.value) == ("prompt.template: the template goes past batchrun's limits the same way on each of "
                             "the first 3 rows: rendering took longer than 0.2 s")
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("template, problem", [
    # a list nested in itself 60 times over: tiny in memory, 2**60 items when printed or compared
    ("{% set ns = namespace(x=[text]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
     "{{ ns.x == ns.x }}", f"a value {TOO_BIG}"),
    ("{% set ns = namespace(s=text) %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     f"the rendered (or joined) text {TOO_BIG}"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f(text, 100) }}",
     f"the rendered (or joined) text {TOO_BIG}"),
    ("{{ (range(1000)|map('string')|map('center', 4000000))|list|length }}{{ text }}",
     f"a sequence {TOO_BIG}"),
    ("{{ ([text] * 100000)|join(text * 40) }}", f"the rendered (or joined) text {TOO_BIG}"),
    ("{{ ','.join(range(100000)|map('string')|map('center', 100)) }}{{ text }}", f"a sequence {TOO_BIG}"),
    ("{{ text|indent(10**9) }}", f"indent() {TOO_BIG}"),
    ("{{ text.expandtabs(10**9) }}", f"str.expandtabs() {TOO_BIG}"),
])
def test_growth_by_repetition_is_bounded(template, problem):
    table = pa.table({"text": ["a\tb", "c\td", "e\tf"]})
    start = time.monotonic()
    with pytest.raises(SpecError) as ei:
        rendered(template, table)
    assert str(ei.value).endswith(f"the first 3 rows: {problem}")
    assert time.monotonic() - start < 10


def test_ordinary_templates_are_unchanged_by_the_limits():
    table = pa.table({"text": ["a b", "c"], "n": [2, 3]})
    template = ("{% set xs = [text, text|upper] %}{{ xs|join('/') }} {{ '%05.1f'|format(n) }} {{ '{:>4}'.format(n) }} "
                "{{ (text ~ '!') * n }} {{ 2 ** 10 }} {{ range(n)|list }} {{ {'k': n}.k }} {{ (1, 2) }} "
                "{% for w in text.split() %}<{{ loop.index }}{{ w }}>{% endfor %}{{ text|center(7) }}|"
                "{{ text|wordwrap(1) }}|{{ text|indent(2, true) }}")
    users, _, errors = rendered(template, table)
    assert errors == [None, None]
    assert users[0] == ("a b/A B 002.0    2 a b!a b! 1024 [0, 1] 2 (1, 2) <1a><2b>  a b  |a\nb|  a b")
    assert users[1] == "c/C 003.0    3 c!c!c! 1024 [0, 1, 2] 3 (1, 2) <1c>   c   |c|  c"
