"""Rows to prompts to token ids.

A prompt is a Jinja template rendered in batchrun's bounded sandbox (``batchrun.io.sandbox``: only the row's
values and Jinja's own filters, with limits on time and size). Each column is a variable; ``row`` holds them all
(for names that are not identifiers); only the columns the templates use are passed and converted
(``batchrun.io.template_columns``). With ``chat`` the tokenizer's chat template wraps the optional system
prompt, the few-shot turns and the rendered user message. A row whose template fails, that would print a
null value, whose value cannot be converted to Python, or whose prompt renders empty gets a per-row error
instead of failing the job (a null in a test such as ``{% if note %}`` is fine).

A row's rendering (template and system prompt together) may take RENDER_SECONDS; going past a sandbox limit
(``TemplateLimitError``) is a per-row error, but a template that goes past a limit whatever the row (one that
uses no column, or fails the same way on each of the first rows) is a spec error (exit 78) instead.
This module knows the tokenizer's interface, not the model, nor how the limits are enforced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from jinja2 import StrictUndefined, TemplateSyntaxError

from batchrun.errors import InputDataError, SpecError
from batchrun.io.sandbox import BoundedEnvironment, check_printed
from batchrun.io.shared_tokens import encode_shared
from batchrun.io.source import require_columns
from batchrun.io.template_columns import Unconvertible, column_values, columns_of, scope_columns
from batchrun.io.template_limits import TemplateLimitError, time_limit
from batchrun.spec import PromptSpec
from batchrun.tokens import TokenTable

RENDER_SECONDS = 2.0  # per row: the user template and the system prompt together
_SAME_FAILURE_ROWS = 3  # the first rows all going past a limit the same way: the template is at fault, exit 78


class _NullRendered(Exception):
    """A template printed a null value (``{{ x }}`` with x null); tests like ``{% if x %}`` are fine."""


def _finalize(value: Any) -> Any:
    if value is None:
        raise _NullRendered()
    return check_printed(value)


_ENV = BoundedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True,
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


def check_templates(spec: PromptSpec | None) -> None:
    """Compile every template of the prompt spec; raise SpecError listing syntax errors (exit 78), and
    templates that use no column yet go past a limit (they would on every row). (None: no prompt section,
    an OpenAI batch file's job.)"""
    if spec is None:
        return
    problems = []
    for name, text in _templates(spec):
        try:
            _ENV.parse(text)
        except TemplateSyntaxError as e:
            problems.append(f"{name}: template syntax error at line {e.lineno}: {e.message}")
    if problems:
        raise SpecError("the prompt templates do not compile", problems)
    for name, text in _templates(spec):
        required, optional, _ = columns_of(_ENV.parse(text))
        if not required | optional:
            try:
                template = _ENV.from_string(text)
                with time_limit(RENDER_SECONDS):
                    template.render({})
            except TemplateLimitError as e:
                problems.append(f"{name}: {e} (whatever the row)")
            except Exception:
                pass  # other failures depend on nothing here either, but stay per-row errors as before
    if problems:
        raise SpecError("the prompt templates go past batchrun's limits", problems)


def compile_template(name: str, text: str) -> Any:
    """A template of batchrun's own variables (not the row's: BatchPrompt's ``n`` and ``item``), compiled in
    the same sandbox; a syntax error is a SpecError naming ``name``."""
    try:
        return _ENV.from_string(text)
    except TemplateSyntaxError as e:
        raise SpecError(f"{name}: template syntax error at line {e.lineno}: {e.message}") from None


def referenced_columns(spec: PromptSpec) -> set[str]:
    """The names the templates read from the row and never assign (a column each, or ``row``)."""
    return set().union(*(columns_of(_ENV.parse(text))[0] for _, text in _templates(spec)))


def render(spec: PromptSpec, table: pa.Table) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Render each row: (user messages, system messages, errors). Only the columns the templates use are
    converted to Python."""
    check_templates(spec)
    scope = scope_columns([_ENV.parse(text) for _, text in _templates(spec)], table.column_names)
    require_columns(table, scope.required, "prompt.template")
    cols = scope.columns
    data = {c: column_values(table, c) for c in cols}
    template = _ENV.from_string(spec.template)
    system = _ENV.from_string(spec.system) if spec.system is not None else None
    users: list[str | None] = []
    systems: list[str | None] = []
    errors: list[str | None] = []
    limit_failures: list[str] = []
    for i in range(table.num_rows):
        values = {c: data[c][i] for c in cols}
        bad = [c for c in cols if isinstance(values[c], Unconvertible)]
        if bad:
            users.append(None), systems.append(None)
            errors.append(f"column {bad[0]!r} has a value the template cannot use: {values[bad[0]].reason}")
            continue
        row_values = {c: values[c] for c in scope.direct}
        if scope.uses_row:
            row_values["row"] = {c: values[c] for c in scope.in_row}
        field = "prompt.template"
        try:
            with time_limit(RENDER_SECONDS):
                user = template.render(row_values)
                field = "prompt.system"
                sys_text = system.render(row_values) if system is not None else None
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


def request_prompts(table: pa.Table, tokenizer: Any) -> Prompts:
    """The prompts of an OpenAI batch file's rows (``io.openai_batch``): a chat request's messages through the
    model's chat template, a completion request's prompt as it is (the tokenizer's special tokens added). A
    line's own problem (``line_error``) is its row's error, and so is a chat request to a model without a chat
    template."""
    lines = table.select(["messages", "prompt", "line_error"]).to_pylist()
    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts: list[str | None] = []
    errors: list[str | None] = []
    plain: list[bool] = []
    for line in lines:
        text, error = None, line["line_error"]
        if error is None and line["messages"] is not None:
            if not has_template:
                error = "a chat request, but the model's tokenizer has no chat template (use /v1/completions)"
            else:
                try:
                    text = tokenizer.apply_chat_template(json.loads(line["messages"]), tokenize=False,
                                                         add_generation_prompt=True)
                except Exception as e:
                    error = f"the model's chat template failed: {e}"
        elif error is None:
            text = line["prompt"]
        texts.append(text), errors.append(error), plain.append(line["messages"] is None)
    chat_tokens = tokenize(tokenizer, [t if not p else None for t, p in zip(texts, plain)], errors,
                           add_special_tokens=False)
    plain_tokens = tokenize(tokenizer, [t if p else None for t, p in zip(texts, plain)], errors)
    rows = [(plain_tokens if p else chat_tokens).row(i) for i, p in enumerate(plain)]
    return Prompts(texts=texts, tokens=TokenTable.from_lists(rows), errors=errors, chat=not all(plain))


def tokenize(tokenizer: Any, texts: list[str | None], errors: list[str | None] | None = None,
             add_special_tokens: bool = True) -> TokenTable:
    """Tokenize with the fast tokenizer in batches (its Rust core uses every CPU core) into a TokenTable.

    ``None`` texts get no tokens. A text that tokenizes to nothing is set to None, with an error in
    ``errors``. The chat template already writes special tokens, so chat prompts pass
    ``add_special_tokens=False``; a plain prompt gets the tokenizer's own (BOS).
    """
    encode = _encoder(tokenizer, add_special_tokens)
    parts = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        idx = [i for i in range(start, min(start + _TOKENIZE_CHUNK, len(texts))) if texts[i] is not None]
        rows: dict[int, list[int]] = {}
        if idx:
            rows = dict(zip(idx, encode([texts[i] for i in idx])))
        for i in idx:
            if not rows[i] and errors is not None:
                errors[i], texts[i] = "prompt is empty after tokenization", None
        end = min(start + _TOKENIZE_CHUNK, len(texts))
        parts.append(TokenTable.from_lists(rows.get(i, ()) for i in range(start, end)))
    return TokenTable.concat(parts)


def _encoder(tokenizer: Any, add_special_tokens: bool) -> Callable[[list[str]], list[list[int]]]:
    """texts -> their token ids. A fast tokenizer's Rust encoder is called straight (``encode_batch_fast``: no
    character offsets, none of transformers' per-text Python) where that gives exactly transformers' ids: no
    truncation or padding set on it (transformers' call would clear them first) and special tokens in the
    text read as transformers would read them; then texts sharing long beginnings tokenize each beginning
    once (``io.shared_tokens``, exact). Otherwise, and for any other tokenizer, transformers' call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation is not None
            or backend.padding is not None
            or getattr(backend, "encode_special_tokens", False) != bool(getattr(tokenizer, "split_special_tokens",
                                                                                  False))):
        return lambda texts: tokenizer(texts, add_special_tokens=add_special_tokens,
                                       return_attention_mask=False)["input_ids"]
    def direct(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    return lambda texts: encode_shared(backend, texts, add_special_tokens, direct)


def _chat_text(tokenizer: Any, spec: PromptSpec, user: str, system: str | None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    for shot in spec.fewshot:
        messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    messages.append({"role": "user", "content": user})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise InputDataError(f"prompt: the model's chat template failed: {e}") from None
