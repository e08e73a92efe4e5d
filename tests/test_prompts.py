"""batchrun.io.prompts: rendering, per-row errors, chat formatting and tokenization with the real SmolLM2
tokenizer (no model weights), and the template sandbox."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batchrun.errors import InputDataError, SpecError
from batchrun.io.prompts import build_prompts, render
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
