"""OpenAI Batch API files, in and out (``input.format: openai_batch``, ``batchrun export``).

**In.** Each line of the JSONL is one request: ``custom_id``, ``method``, ``url`` (``/v1/chat/completions`` or
``/v1/completions``) and ``body`` (``messages`` or ``prompt``, ``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``logprobs``/``top_logprobs``, ``response_format``).
``read_requests`` makes one row per line: ``custom_id`` (the id), ``url``, ``body`` (the line's body, JSON
text), ``messages`` (JSON text; chat) or ``prompt`` (text; completions), each sampling field as a column (null
where the line leaves it to the job's ``sampling``), ``constraint`` (the ``response_format`` as batchrun's
constraint JSON) and ``line_error``: a line that is not JSON, lacks a field or holds a bad value is a row with
its error, never a job failure (a missing or repeated ``custom_id`` gets ``line N`` as its id).

**Out.** ``export`` turns a job's Parquet dataset into the Batch API's output JSONL (one line per request,
``response.body`` with ``choices`` and ``usage``) and its error JSONL. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
COLUMNS = pa.schema([
    ("custom_id", pa.string()), ("url", pa.string()), ("body", pa.string()), ("messages", pa.string()),
    ("prompt", pa.string()), ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()),
    ("stop", pa.list_(pa.string())), ("seed", pa.int64()), ("n", pa.int64()), ("logprobs", pa.int64()),
    ("constraint", pa.string()), ("line", pa.int64()), ("line_error", pa.string()),
])
_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 128


class LineError(ValueError):
    """What is wrong with one line (its row's error)."""


def read_requests(paths: Iterable[str]) -> pa.Table:
    """One row per line of the files (blank lines skipped), in order; see the module's docstring."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                rows.append(_row(text, number, seen))
    return pa.Table.from_pylist(rows, schema=COLUMNS)


def _row(text: str, number: int, seen: set[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS.names)
    row["line"] = number
    try:
        line = json.loads(text)
    except ValueError as e:
        return _bad(row, number, seen, f"line {number} is not JSON: {e}")
    if not isinstance(line, dict):
        return _bad(row, number, seen, f"line {number} is not a JSON object")
    cid = line.get("custom_id")
    if isinstance(cid, str) and cid and cid not in seen:
        row["custom_id"] = cid
        seen.add(cid)
    elif isinstance(cid, str) and cid:
        return _bad(row, number, seen, f"custom_id {cid!r} is repeated (line {number}); each must be unique")
    else:
        return _bad(row, number, seen, f"line {number} has no custom_id (a non-empty string)")
    try:
        _fill(row, line)
    except LineError as e:
        row = {**dict.fromkeys(COLUMNS.names), "custom_id": row["custom_id"], "line": number,
               "line_error": str(e)}
    return row


def _bad(row: dict[str, Any], number: int, seen: set[str], message: str) -> dict[str, Any]:
    cid = f"line {number}"
    while cid in seen:
        cid += "'"
    seen.add(cid)
    row.update(custom_id=cid, line_error=message)
    return row


def _fill(row: dict[str, Any], line: dict[str, Any]) -> None:
    method, url, body = line.get("method", "POST"), line.get("url"), line.get("body")
    if method != "POST":
        raise LineError(f"method must be POST (got {method!r})")
    if url not in (CHAT, COMPLETIONS):
        raise LineError(f"url must be {CHAT} or {COMPLETIONS} (got {url!r})")
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object")
    row["url"], row["body"] = url, json.dumps(body, ensure_ascii=False)
    if url == CHAT:
        row["messages"] = json.dumps(_messages(body.get("messages")), ensure_ascii=False)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise LineError("body.prompt must be a non-empty string (one prompt per line)")
        row["prompt"] = prompt
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    row["max_tokens"] = _number(limit, "max_tokens", int, 1)
    row["temperature"] = _number(body.get("temperature"), "temperature", float, 0)
    row["top_p"] = _number(body.get("top_p"), "top_p", float, 0)
    row["seed"] = _number(body.get("seed"), "seed", int, 0)
    row["n"] = _number(body.get("n"), "n", int, 1)
    if row["n"] is not None and row["n"] > MAX_N:
        raise LineError(f"body.n must be at most {MAX_N} (got {row['n']})")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise LineError("body.stop must be a string or a list of non-empty strings")
        row["stop"] = stop
    row["logprobs"] = _logprobs(body, url)
    row["constraint"] = _constraint(body.get("response_format"))


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LineError("body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise LineError(f"body.messages[{i}] needs a role ({', '.join(_ROLES)})")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise LineError(f"body.messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise LineError(f"body.messages[{i}].content must be text")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _number(value: Any, name: str, kind: type, least: float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise LineError(f"body.{name} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    if value < least:
        raise LineError(f"body.{name} must be >= {least} (got {value!r})")
    return kind(value)


def _logprobs(body: dict[str, Any], url: str) -> int | None:
    """The alternatives asked per token (0: only the chosen tokens'), None if log-probabilities are not asked."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if url == COMPLETIONS:  # logprobs: an integer, the alternatives
        return None if lp is None else _number(lp, "logprobs", int, 0)
    if lp in (None, False):
        if top is not None:
            raise LineError("body.top_logprobs needs logprobs: true")
        return None
    if lp is not True:
        raise LineError(f"body.logprobs must be true or false (got {lp!r})")
    return 0 if top is None else _number(top, "top_logprobs", int, 0)


def _constraint(fmt: Any) -> str | None:
    """``response_format`` as a per-row constraint (``sampling.constraint.column``'s JSON), None for text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"json_schema": {"type": "object"}})
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise LineError("body.response_format.json_schema.schema must be a JSON schema object")
        return json.dumps({"json_schema": schema}, ensure_ascii=False)
    raise LineError(f"body.response_format.type must be text, json_object or json_schema (got {kind!r})")


# -- out ---------------------------------------------------------------------------------------------------


def export(rows: list[dict[str, Any]], model: str, output: Path) -> tuple[int, int, Path]:
    """Write the output JSONL to ``output`` and the error JSONL beside it (``<stem>.errors.jsonl``) from a
    dataset's rows (each input row's output rows, ``sample`` 0.. if any); returns (responses, errors, the
    error file's path)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(r["custom_id"], []).append(r)
    errors_path = output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")
    done = failed = 0
    with open(output, "w", encoding="utf-8") as out, open(errors_path, "w", encoding="utf-8") as err:
        for cid, samples in by_id.items():
            samples.sort(key=lambda r: r.get("sample") or 0)
            first = samples[0]
            request_id = "req_" + hashlib.sha256(cid.encode()).hexdigest()[:24]
            line_id = "batch_" + request_id
            problem = first.get("line_error") or next((r["error"] for r in samples if r.get("error")), None)
            if problem:
                body = {"error": {"message": problem, "type": "invalid_request_error", "param": None,
                                  "code": None}}
                record = {"id": line_id, "custom_id": cid,
                          "response": {"status_code": 400, "request_id": request_id, "body": body}, "error": None}
                err.write(json.dumps(record, ensure_ascii=False) + "\n")
                failed += 1
                continue
            out.write(json.dumps({"id": line_id, "custom_id": cid,
                                  "response": {"status_code": 200, "request_id": request_id,
                                               "body": _body(first, samples, model, request_id)},
                                  "error": None}, ensure_ascii=False) + "\n")
            done += 1
    return done, failed, errors_path


def _body(first: dict[str, Any], samples: list[dict[str, Any]], model: str, request_id: str) -> dict[str, Any]:
    chat = first["url"] == CHAT
    wanted = first.get("n") or 1
    asked = first.get("logprobs")
    choices = []
    for i, r in enumerate(samples[:wanted]):
        choice: dict[str, Any] = {"index": i, "finish_reason": r.get("finish_reason")}
        if chat:
            choice["message"] = {"role": "assistant", "content": r.get("output"), "refusal": None}
        else:
            choice["text"] = r.get("output")
        choice["logprobs"] = _choice_logprobs(r, asked, chat)
        choices.append(choice)
    completion = sum(r.get("output_tokens") or 0 for r in samples[:wanted])
    prompt = first.get("prompt_tokens") or 0
    return {"id": ("chatcmpl-" if chat else "cmpl-") + request_id[4:], "object":
            "chat.completion" if chat else "text_completion", "created": first.get("created") or 0,
            "model": json.loads(first["body"]).get("model") or model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def _choice_logprobs(r: dict[str, Any], asked: int | None, chat: bool) -> dict[str, Any] | None:
    lps = r.get("token_logprobs")
    if asked is None or lps is None:
        return None
    tops = r.get("top_logprobs") or [[] for _ in lps]
    tokens = r.get("tokens") or [t[0]["token"] if t else "" for t in tops]
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"],
                                               "bytes": list(a["token"].encode())} for a in top[:asked]]}
                            for tok, lp, top in zip(tokens, lps, tops)], "refusal": None}
    return {"tokens": tokens, "token_logprobs": lps,
            "top_logprobs": [{a["token"]: a["logprob"] for a in top[:asked]} for top in tops]}
