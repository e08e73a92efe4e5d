"""batchrun.io.prompts: rendering, per-row errors, chat formatting and tokenization with the real SmolLM2
tokenizer (no model weights), the names a template assigns (never input columns), and column types that do not
convert. The template sandbox and its limits: test_template_sandbox.py."""

from __future__ import annotations

import decimal

import pyarrow as pa
import pytest

from batchrun.errors import InputDataError, SpecError
from batchrun.io.prompts import build_prompts, check_templates, referenced_columns
from batchrun.spec import FewShot, PromptSpec
from helpers import PROMPT_TABLE as TABLE
from helpers import rendered


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


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


@pytest.mark.parametrize("special", [True, False])
def test_tokenizing_straight_through_the_rust_encoder_gives_transformers_ids(tok, special):
    """``tokenize`` calls the fast tokenizer's Rust encoder itself (no offsets, no per-text Python): the same
    ids as transformers' call, special tokens written in the text included; with truncation set on the
    encoder it goes through transformers' call (which clears it) and still gives every token."""
    from batchrun.io.prompts import _encoder, tokenize

    texts = ["hi there", "<|im_start|>user\nQ?<|im_end|>\n", "  spaces  and\ttabs\n", "ünïcödé — 東京 🚀",
             "x " * 300, "<|endoftext|>"]
    want = tok(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
    assert _encoder(tok, special)(texts) == want
    table = tokenize(tok, [None, *texts], add_special_tokens=special)
    assert [table.row(i).tolist() for i in range(len(texts) + 1)] == [[], *want]
    backend = tok.backend_tokenizer
    backend.enable_truncation(5)
    try:
        assert _encoder(tok, special)(texts) == want
    finally:
        backend.no_truncation()


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
