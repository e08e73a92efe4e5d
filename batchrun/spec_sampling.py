"""The ``sampling`` section of a job spec: decoding settings (each a number, or a column for per-row values),
stop strings, samples per row, log-probabilities, and the constraint (``sampling.constraint``). Pydantic is used
here as in ``batchrun.spec``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator

from batchrun.spec_errors import number_hint
from batchrun.spec_yaml import show

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a column name

# Sampling at a temperature below this divides fp32 logits into overflow (inf - inf = nan) for no gain: it is
# greedy decoding in all but name. 0 means greedy.
MIN_TEMPERATURE = 0.01


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CONSTRAINT_KINDS = ("json_schema", "regex", "choices", "grammar")


class ConstraintSpec(_Strict):
    """Constrained decoding: every output matches exactly one of ``json_schema`` (a mapping, JSON text, or the
    path of a .json file), ``regex``, ``choices`` (a list of strings) or ``grammar`` (Lark, llguidance's
    dialect); or ``column`` names a column whose value, per row, is a JSON object with one of those keys."""

    json_schema: dict[str, Any] | bool | str | None = None
    regex: str | None = Field(default=None, min_length=1)
    choices: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    grammar: str | None = Field(default=None, min_length=1)
    column: str | None = Field(default=None, pattern=IDENT)

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if any(c == "" for c in v):
                raise ValueError("choices must not be empty strings")
            if len(set(v)) != len(v):
                raise ValueError(f"choices must be distinct (got {show(v)})")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> ConstraintSpec:
        given = [k for k in (*CONSTRAINT_KINDS, "column") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json_schema, regex, choices, grammar or column "
                             f"(got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in (*CONSTRAINT_KINDS, "column") if getattr(self, k) is not None)


# The numeric sampling fields, each a number or the name of a column (per-row values, checked per row by
# runtime/row_sampling.py against the same ranges).
_NUMBERS = {
    "temperature": TypeAdapter(Annotated[float, Field(ge=0, le=2, strict=True, allow_inf_nan=False)]),
    "top_p": TypeAdapter(Annotated[float, Field(gt=0, le=1, strict=True, allow_inf_nan=False)]),
    "top_k": TypeAdapter(Annotated[int, Field(ge=0, strict=True)]),
    "seed": TypeAdapter(Annotated[int, Field(ge=0, lt=2**63, strict=True)]),
}
MAX_STOP = 16
_STOP_LIST = TypeAdapter(Annotated[list[str], Field(max_length=MAX_STOP)])


class SamplingSpec(_Strict):
    """Decoding. temperature 0 is greedy. ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` and ``seed`` are
    each a number or the name of a column (per-row values); ``stop`` is stop strings or ``{column: NAME}``.
    ``n`` samples per input row."""

    max_tokens: int | str = 256
    temperature: float | str = 0.0
    top_p: float | str = 1.0
    top_k: int | str = 0
    stop: list[str] | dict[str, str] = Field(default_factory=list)
    seed: int | str = 0
    n: int = Field(default=1, ge=1, le=1000, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)  # chosen tokens' + this many alternatives
    ignore_eos: bool = Field(default=False, strict=True)
    constraint: ConstraintSpec | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, v: Any) -> int | str:
        if isinstance(v, bool):
            raise ValueError(f"must be a positive integer or a column name (got {show(v)})")
        if isinstance(v, int):
            if not 1 <= v <= 1_000_000:
                raise ValueError(f"must be between 1 and 1000000 (got {v})")
            return v
        if isinstance(v, str) and re.match(IDENT, v):
            return v
        raise ValueError(f"must be a positive integer or a column name (got {show(v)})")

    @field_validator("temperature", "top_p", "top_k", "seed", mode="wrap")
    @classmethod
    def _number_or_column(cls, v: Any, handler: Any, info: ValidationInfo) -> float | int | str:
        if isinstance(v, str) and re.match(IDENT, v):
            return v
        adapter = _NUMBERS[info.field_name]
        if isinstance(v, str) and not number_hint("float_type", v):  # (text that YAML misread gets its hint)
            number = "an integer" if adapter.core_schema["type"] == "int" else "a number"
            raise ValueError(f"must be {number} or a column name (got {show(v)})")
        v = adapter.validate_python(v)  # (its errors keep their kind: reported like any field's)
        if info.field_name == "temperature" and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (got {v!r})")
        return v

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, v: Any, handler: Any) -> list[str] | dict[str, str]:
        if isinstance(v, dict):
            if list(v) != ["column"] or not (isinstance(v["column"], str) and re.match(IDENT, v["column"])):
                raise ValueError(f"must be stop strings, or {{column: NAME}} for per-row stop strings (got {show(v)})")
            return dict(v)
        stop = _STOP_LIST.validate_python([v] if isinstance(v, str) else v)
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @model_validator(mode="after")
    def _eos_ends_a_constraint(self) -> SamplingSpec:
        if self.ignore_eos and self.constraint is not None:
            raise ValueError("ignore_eos cannot be used with a constraint: once the constraint is complete it "
                             "allows only EOS (remove one of them)")
        return self

    def column(self, name: str) -> str | None:
        """The column ``name`` (temperature, top_p, top_k, seed, stop, max_tokens) is read from, if any."""
        v = getattr(self, name)
        return v["column"] if isinstance(v, dict) else v if isinstance(v, str) else None
