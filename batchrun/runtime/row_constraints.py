"""Which constraint each row decodes under (``sampling.constraint``), compiled before any row runs.

A job-wide constraint that does not compile is a spec error (exit 78); with ``constraint.column`` each row's
value (JSON text: an object with one of json_schema, regex, choices, grammar; null: no constraint) is compiled
once per distinct value, and a bad value is that row's error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrun.engine.constraints import KINDS, CompiledConstraint, ConstraintError, compile_constraint
from batchrun.errors import InputDataError, SpecError
from batchrun.io.source import Source, require_columns
from batchrun.spec import JobSpec
from batchrun.spec_sampling import ConstraintSpec

FIELD = "sampling.constraint"


@dataclass
class ConstraintUse:
    """A job's constraint, for ``batchrun plan`` and the manifest: its kind, how many rows use it, the
    grammars compiled and the time that took, and (after the run) the CPU time spent computing token masks, and
    how many masks rows in the same grammar state shared (``grammar_pool.StepMasks``), and how many tokens were
    drawn before their (wide) mask and then found allowed (``engine.masks``)."""

    kind: str
    rows: int
    compiled: list[CompiledConstraint]
    compile_s: float

    def report(self) -> dict[str, Any]:
        masks = sum(c.stats["masks"] for c in self.compiled)
        mask_s = sum(c.stats["mask_s"] for c in self.compiled)
        unmasked = sum(c.stats.get("unmasked", 0) for c in self.compiled)
        allowed = sum(c.stats.get("unmasked_allowed", 0) for c in self.compiled)
        shared = sum(c.stats.get("masks_shared", 0) for c in self.compiled)
        return {"kind": self.kind, "rows": self.rows, "grammars": len(self.compiled),
                "compile_s": round(self.compile_s, 3), "masks": masks, "mask_s": round(mask_s, 3),
                "mask_ms_each": round(1000 * mask_s / masks, 3) if masks else None,
                "masks_shared": shared, "drawn_before_mask": unmasked, "drawn_before_mask_allowed": allowed}


def row_constraints(spec: JobSpec, source: Source, tokenizer: Any
                    ) -> tuple[list[CompiledConstraint | None], dict[int, str], ConstraintUse | None]:
    """Each row's compiled constraint (None: unconstrained), (row -> message) for rows whose own constraint
    is bad, and what the job's constraint is (None without one)."""
    c = spec.sampling.constraint
    n = source.num_rows
    if c is None:
        return [None] * n, {}, None
    t = time.monotonic()
    if c.column is None:
        value = json_schema_value(c) if c.kind == "json_schema" else getattr(c, c.kind)
        try:
            compiled = compile_constraint(c.kind, value, tokenizer)
        except ConstraintError as e:
            raise SpecError(f"{FIELD}.{c.kind}: {e}") from None
        return [compiled] * n, {}, ConstraintUse(c.kind, n, [compiled], time.monotonic() - t)
    require_columns(source.table, [c.column], f"{FIELD}.column")
    col = source.table.column(c.column)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise InputDataError(f"{FIELD}.column: column {c.column!r} has type {col.type}; it must hold JSON "
                             "text, e.g. {\"regex\": \"[0-9]+\"}")
    out: list[CompiledConstraint | None] = []
    errors: dict[int, str] = {}
    cache: dict[str, CompiledConstraint | str] = {}
    for i, text in enumerate(col.to_pylist()):
        if text is None:
            out.append(None)
            continue
        if text not in cache:
            cache[text] = _compile_row(text, tokenizer)
        got = cache[text]
        if isinstance(got, str):
            errors[i] = f"constraint column {c.column!r}: {got}"
            out.append(None)
        else:
            out.append(got)
    distinct = [v for v in cache.values() if not isinstance(v, str)]
    used = sum(1 for v in out if v is not None)
    return out, errors, ConstraintUse(f"column {c.column}", used, distinct, time.monotonic() - t)


def _compile_row(text: str, tokenizer: Any) -> CompiledConstraint | str:
    """A row's constraint, or the message saying why it is bad."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS:
        return f"must be a JSON object with one key, one of {', '.join(KINDS)} (got {text[:80]!r})"
    kind, arg = next(iter(value.items()))
    if kind in ("regex", "grammar") and not (isinstance(arg, str) and arg):
        return f"{kind} must be a non-empty string"
    if kind == "choices" and not (isinstance(arg, list) and arg and all(isinstance(x, str) and x for x in arg)):
        return "choices must be a non-empty list of non-empty strings"
    try:
        return compile_constraint(kind, arg, tokenizer)
    except ConstraintError as e:
        return f"{kind}: {e}"


def json_schema_value(c: ConstraintSpec) -> Any:
    """The schema itself: a mapping (or true/false) as given, JSON text, or read from a .json file."""
    v = c.json_schema
    if not isinstance(v, str):
        return v
    where = f"{FIELD}.json_schema"
    if v.lstrip().startswith("{"):
        try:
            return json.loads(v)
        except ValueError as e:
            raise SpecError(f"{where}: not valid JSON ({e})") from None
    path = Path(v).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{where}: no such file {v!r} (give the schema inline, as JSON text, or a .json file)"
                        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: cannot read {v!r}: {e}") from None
    except ValueError as e:
        raise SpecError(f"{where}: {v!r} is not valid JSON ({e})") from None
