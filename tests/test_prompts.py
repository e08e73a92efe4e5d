"""batchrun.io.prompts: rendering, per-row errors, chat formatting and tokenization with the real SmolLM2
tokenizer (no model weights), and the template sandbox."""

from __future__ import annotations

import decimal
import threading
import time

import pyarrow as pa
import pytest

from batchrun.errors import InputDataError, SpecError
from batchrun.io import prompts
from batchrun.io.prompts import build_prompts, check_templates, referenced_columns, render
from batchrun.spec import FewShot, PromptSpec


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


TABLE = pa.table({"text": ["hi there", None, "x"], "n": [1, 0, 2], "col name": ["A", "B", "C"],
                  "blank": [" ", "", " \n"]})


def rendered(template: str, table: pa.Table = TABLE, system: str | None = None):
    return render(PromptSpec(template=template, system=system), table)


# ------------------------------------------------------------------------------------------- rendering


def test_simple_template_exact_text_and_null_row():
    users, systems, errors = rendered("Review: {{ text }} ({{ n }})\n")
    assert users == ["Review: hi there (1)\n", None, "Review: x (2)\n"]
    assert systems == [None, None, None]
    assert errors == [None, "column 'text' is null", None]


def test_row_access_for_column_names_that_are_not_identifiers():
    users, _, errors = rendered('{{ row["col name"] }}/{{ row.n }}')
    assert users == ["A/1", "B/0", "C/2"] and errors == [None, None, None]


def test_null_column_through_row_is_a_row_error():
    users, _, errors = rendered('{{ row["text"] }}')
    assert users[1] is None and errors[1] == "column 'text' is null"


def test_system_template_rendered_per_row():
    users, systems, errors = rendered("{{ text }}", system="Judge {{ n }}.")
    assert (users, systems, errors) == (["hi there", None, "x"], ["Judge 1.", None, "Judge 2."],
                                        [None, "column 'text' is null", None])


def test_runtime_error_fails_only_that_row():
    users, _, errors = rendered("{{ 10 // n }}")
    assert users == ["10", None, "5"]
    assert errors == [None, "template error: ZeroDivisionError: integer division or modulo by zero", None]


def test_undefined_attribute_is_a_row_error():
    _, _, errors = rendered("{{ row.nope }}")
    assert all(e.startswith("template error: UndefinedError: ") for e in errors)


def test_empty_rendering_is_a_row_error():
    users, _, errors = rendered("{{ blank }}")
    assert users == [None, None, None] and errors == ["prompt is empty after rendering"] * 3


def test_missing_columns_fail_the_job():
    with pytest.raises(InputDataError) as ei:
        rendered("{{ missing }} {{ other }} {{ text }}")
    assert ei.value.exit_code == 65
    assert str(ei.value) == ("prompt.template: the input has no column 'missing', 'other' "
                             "(columns: text, n, col name, blank)")


@pytest.mark.parametrize("template, system, problem", [
    ("{{ text ", None, "prompt.template: template syntax error at line 1: "
                       "unexpected end of template, expected 'end of print statement'."),
    ("{% if %}", None, "prompt.template: template syntax error at line 1: "
                       "Expected an expression, got 'end of statement block'"),
    ("ok", "line\n{{ }}", "prompt.system: template syntax error at line 2: "
                          "Expected an expression, got 'end of print statement'"),
])
def test_template_syntax_error_is_spec_error(template, system, problem):
    with pytest.raises(SpecError) as ei:
        rendered(template, system=system)
    assert ei.value.exit_code == 78
    assert ei.value.message == "the prompt templates do not compile" and ei.value.problems == [problem]


# ---------------------------------------------------------------------------------- chat and tokenizing


def test_chat_text_and_tokens_match_the_tokenizer(tok):
    spec = PromptSpec(template="Review: {{ text }}", system="Be brief.",
                      fewshot=[FewShot(user="U1", assistant="A1"), FewShot(user="U2", assistant="A2")])
    p = build_prompts(spec, TABLE, tok)
    assert p.chat is True and len(p) == 3
    for i, text in ((0, "hi there"), (2, "x")):
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"},
                    {"role": "user", "content": f"Review: {text}"}]
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert p.texts[i] == expected
        assert p.texts[i].endswith(f"<|im_start|>user\nReview: {text}<|im_end|>\n<|im_start|>assistant\n")
        assert p.tokens.row(i).tolist() == tok(expected, add_special_tokens=False)["input_ids"]
    assert (p.texts[1], p.tokens.row(1).tolist(), p.errors) == (None, [], [None, "column 'text' is null", None])
    assert p.num_tokens == len(p.tokens.row(0).tolist()) + len(p.tokens.row(2).tolist())


def test_chat_without_system_uses_the_tokenizers_default(tok):
    p = build_prompts(PromptSpec(template="{{ text }}", chat=True), TABLE.slice(0, 1), tok)
    expected = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
                                       add_generation_prompt=True)
    assert p.texts == [expected]


def test_chat_off_prepends_system_with_a_blank_line(tok):
    p = build_prompts(PromptSpec(template="Review: {{ text }}", system="Be brief.", chat=False), TABLE, tok)
    assert p.chat is False
    assert p.texts == ["Be brief.\n\nReview: hi there", None, "Be brief.\n\nReview: x"]
    assert p.tokens.row(0).tolist() == tok("Be brief.\n\nReview: hi there")["input_ids"]
    assert p.tokens.row(2).tolist() == tok("Be brief.\n\nReview: x")["input_ids"]
    plain = build_prompts(PromptSpec(template="{{ text }}", chat=False), TABLE, tok)
    assert plain.texts == ["hi there", None, "x"]


class _NoChatTokenizer:
    chat_template = None


@pytest.mark.parametrize("spec, message", [
    (PromptSpec(template="{{ text }}", chat=True),
     "prompt.chat: true, but the model's tokenizer has no chat template; set chat: false"),
    (PromptSpec(template="{{ text }}", fewshot=[FewShot(user="u", assistant="a")]),
     "prompt.fewshot: the model's tokenizer has no chat template; few-shot turns need one"),
])
def test_chat_needs_a_chat_template(spec, message):
    with pytest.raises(SpecError) as ei:
        build_prompts(spec, TABLE, _NoChatTokenizer())
    assert str(ei.value) == message


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


# -------------------------------------------------------------------------------- columns and scoping

SCOPED = [
    "{% if flag %}{% set n = 'set' %}{% endif %}{{ n }}",  # set inside if, used after
    "{% if flag %}{% set n = 'set' %}{{ n }}{% endif %}",  # set and used inside if
    "{% set n = 'set' %}{% if flag %}{{ n }}{% endif %}",  # set before the if
    "{% for i in [1] %}{% set n = 'set' %}{{ n }}{% endfor %}",
    "{% for n in ['set'] %}{{ n }}{% endfor %}",
    "{% with n = 'set' %}{{ n }}{% endwith %}",
    "{% macro n() %}set{% endmacro %}{{ n() }}",
    "{% macro m(n) %}{{ n }}{% endmacro %}{{ m('set') }}",
    "{% set n %}set{% endset %}{{ n }}",
    "{{ n }}{% set n = 'later' %}",  # read before it is set: the row's n, or undefined
]


@pytest.mark.parametrize("template", SCOPED)
def test_names_the_template_assigns_are_not_input_columns(template):
    """validate and submit agree: a name set, looped over, bound by with/macro is never a missing column."""
    check_templates(PromptSpec(template=template))
    assert "n" not in referenced_columns(PromptSpec(template=template))
    table = pa.table({"flag": [True]})
    users, _, errors = rendered(template + "{{ flag }}", table)
    if template.startswith("{{ n }}"):
        assert errors == ["template error: UndefinedError: 'n' is undefined"]
    else:
        assert errors == [None] and users[0].startswith("set")


def test_an_assigned_name_still_reads_the_column_where_jinja_would():
    table = pa.table({"flag": [True, False], "n": ["col1", "col2"]})
    users, _, errors = rendered("{% if flag %}{% set n = 'set' %}{% endif %}{{ n }}", table)
    assert (users, errors) == (["set", "col2"], [None, None])
    users, _, errors = rendered("{% if flag %}{% set n = 'set' %}{% endif %}{{ n }}",
                                pa.table({"flag": [True, False]}))
    assert users == ["set", None] and errors[1] == "template error: UndefinedError: 'n' is undefined"


# ------------------------------------------------------------------------------- awkward column types

AWKWARD = pa.table({
    "text": ["a", "b"],
    "ts_ns": pa.array([1, 1_700_000_000_123_456_789], pa.timestamp("ns")),  # nanoseconds: no Python datetime
    "far": pa.array([253_402_300_800_000, 0], pa.timestamp("ms")),  # year 10000: past datetime's range
    "dec": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(10, 2)),
    "nested": pa.array([{"a": 1, "b": [1, 2]}, {"a": 2, "b": []}]),
    "blob": pa.array([b"x" * 10, b"y"], pa.large_binary()),
})


@pytest.mark.parametrize("template", ["{{ text }}", "{{ row.text }}", "{{ row['text'] }}"])
def test_columns_the_template_does_not_use_are_not_converted(template):
    users, _, errors = rendered(template, AWKWARD)
    assert (users, errors) == (["a", "b"], [None, None])


def test_used_columns_that_cannot_convert_are_row_errors_naming_the_column():
    users, _, errors = rendered("{{ text }} {{ ts_ns }}", AWKWARD)
    assert users == [None, None]
    assert all(e.startswith("column 'ts_ns' has a value the template cannot use: ValueError: Nanosecond")
               for e in errors)
    users, _, errors = rendered("{{ text }} {{ row.far.year }}", AWKWARD)
    assert users == [None, "b 1970"]
    assert errors[0] == "column 'far' has a value the template cannot use: OverflowError: date value out of range"
    users, _, errors = rendered("{{ row }}", AWKWARD.select(["text", "far"]))  # row used whole: every column
    assert users[1] == "{'text': 'b', 'far': datetime.datetime(1970, 1, 1, 0, 0)}" and errors[0].startswith(
        "column 'far' has a value")


def test_decimal_struct_and_binary_columns_render():
    users, _, errors = rendered("{{ dec }} {{ nested.a }} {{ nested.b|length }} {{ blob|length }}",
                                AWKWARD.slice(0, 1))
    assert (users, errors) == (["1.50 1 2 10"], [None])
