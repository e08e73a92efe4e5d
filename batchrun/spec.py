"""The job spec: what a ``jobs/x.yaml`` file may say, validated into typed, immutable objects.

pydantic is used here, at the YAML boundary, and nowhere else. Every problem in a spec is reported at once
as ``field.path: what is wrong (got X)``; unknown keys are errors. Reading the YAML itself (safely, with
``--set`` overrides) is ``batchrun.spec_yaml``'s; ``load_spec`` joins the two. This module knows nothing about
how a job runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from batchrun.errors import SpecError, UsageError
from batchrun.spec_batchprompt import BatchPromptSpec
from batchrun.spec_engine import DEVICE as _DEVICE
from batchrun.spec_engine import EngineSpec
from batchrun.spec_errors import describe
from batchrun.spec_sampling import IDENT as _IDENT
from batchrun.spec_sampling import SamplingSpec
from batchrun.spec_yaml import apply_override, parse_yaml, show

# input.path URLs. file:// is a local path (DuckDB reads it locally), confined like one. Remote schemes are read
# through DuckDB's httpfs (http, https, s3 and its aliases, gcs, r2, hf) or azure (az, azure, abfss) extension;
# any other scheme is refused rather than handed to DuckDB (which could treat it as something local).
REMOTE_SCHEMES = ("http", "https", "s3", "s3a", "s3n", "gs", "gcs", "r2", "hf", "az", "azure", "abfss")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# output.path URLs: an object store prefix, written through pyarrow's filesystems (batchrun.io.store).
OUTPUT_SCHEMES = ("s3", "gs", "gcs")

def url_scheme(path: str) -> str | None:
    """The lower-cased scheme of a ``scheme://...`` path, or None for a plain path."""
    m = _URL.match(path)
    return m.group(1).lower() if m else None


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL (``file:///p`` or ``file://localhost/p``)."""
    rest = url[len("file://"):]
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost"):]
    return rest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which model to run. ``path`` is a built-in name (``smollm2-135m-instruct``), a local Hugging Face
    model directory, a ``.gguf`` file, or a hub id (needs network or a warm hub cache).

    ``load: random`` (benchmarks, smoke tests) reads no weights: the model is built from a config with random
    weights drawn with ``seed``. The config is a built-in ``size`` (then ``tokenizer`` is required and ``path``
    is not allowed) or ``path``'s (whose tokenizer is used unless ``tokenizer`` is given)."""

    path: str | None = Field(default=None, min_length=1)
    load: Literal["weights", "random"] = "weights"
    size: Literal["tiny", "1b", "8b"] | None = None
    seed: int = Field(default=0, ge=0, lt=2**63, strict=True)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = Field(default=False, strict=True)

    @model_validator(mode="after")
    def _load(self) -> ModelSpec:
        if self.load == "weights":
            if self.size is not None:
                raise ValueError(f"size is only for load: random (got size: {self.size}); set load: random, or "
                                 "remove size")
            if self.seed != 0:
                raise ValueError(f"seed is only for load: random (got seed: {self.seed}); set load: random, or "
                                 "remove seed")
            if self.path is None:
                raise ValueError("path is required (or load: random with a size)")
        elif self.size is None and self.path is None:
            raise ValueError("load: random needs a size (tiny, 1b or 8b) or a path to take the config from")
        elif self.size is not None and self.path is not None:
            raise ValueError(f"load: random takes the config from size or from path, not both (got size: "
                             f"{self.size}, path: {show(self.path)}); give the tokenizer as tokenizer")
        elif self.size is not None and self.tokenizer is None:
            raise ValueError(f"load: random with size: {self.size} needs a tokenizer (a tokenizer or model "
                             "directory, a built-in model name, a .gguf file or a hub id)")
        return self

    @property
    def label(self) -> str:
        """The model in logs and metadata: ``path``, or ``random:<size or path>`` for random weights."""
        if self.load == "random":
            return f"random:{self.size or self.path}"
        return str(self.path)


class InputSpec(_Strict):
    """Where rows come from: files read by DuckDB, optionally filtered or joined by SQL."""

    path: str | list[str]
    format: Literal["auto", "parquet", "csv", "json", "openai_batch"] = "auto"
    table: str = Field(default="input", pattern=_IDENT)
    sql: str | None = None
    id: str | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _paths_not_empty(cls, v: Any) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise ValueError(f"must be a file path, a glob, or a list of them (got {show(v)})")
        if not items:
            raise ValueError("must name at least one file")
        for p in items:
            if not p.strip():
                raise ValueError("a file path must not be empty")
            scheme = url_scheme(p)
            if scheme == "file" and not file_url_path(p).startswith("/"):
                raise ValueError(f"a file:// URL must name a local absolute path, file:///path (got {show(p)})")
            if scheme and scheme != "file" and scheme not in REMOTE_SCHEMES:
                raise ValueError(f"unsupported URL scheme {scheme!r} (got {show(p)}); use a local path, file://, "
                                 f"or one of {', '.join(REMOTE_SCHEMES)}")
        return v

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class FewShot(_Strict):
    user: str
    assistant: str


class PromptSpec(_Strict):
    """How a row becomes a prompt: a sandboxed Jinja template over the row's columns."""

    template: str = Field(min_length=1)
    system: str | None = None
    chat: bool | None = Field(default=None, strict=True)  # None: use the tokenizer's chat template when it has one
    fewshot: list[FewShot] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fewshot_needs_chat(self) -> PromptSpec:
        if self.fewshot and self.chat is False:
            raise ValueError("fewshot examples are chat turns: set chat to true (or leave it unset)")
        return self


class OutputSpec(_Strict):
    """Where results go: a Parquet dataset directory, local or on an object store (``s3://bucket/prefix``,
    ``gs://bucket/prefix``)."""

    path: str = Field(min_length=1)
    columns: list[str] | None = None  # input columns copied to the output; None copies all of them
    part_rows: int = Field(default=1000, ge=1, le=10_000_000, strict=True)
    # above it the job fails (exit 1)
    max_error_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @field_validator("path")
    @classmethod
    def _output_url(cls, v: str) -> str:
        scheme = url_scheme(v)
        if scheme is None:
            return v
        if scheme not in OUTPUT_SCHEMES:
            raise ValueError(f"unsupported URL scheme {scheme!r} (got {show(v)}); use a local directory, "
                             "s3://bucket/prefix or gs://bucket/prefix")
        bucket, _, prefix = v[len(scheme) + 3:].rstrip("/").partition("/")
        if not bucket or not prefix.strip("/"):
            raise ValueError(f"an object store output needs a bucket and a prefix in it, {scheme}://bucket/prefix "
                             f"(got {show(v)})")
        return v


class JobSpec(_Strict):
    """A whole job. ``name`` defaults to the job file's name without extension."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    model: ModelSpec
    input: InputSpec
    prompt: PromptSpec | None = None  # required, except with input.format openai_batch (the lines' messages)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    mode: Literal["generate", "batchprompt"] = "generate"  # batchprompt: several rows per prompt, voted
    batchprompt: BatchPromptSpec | None = None

    @model_validator(mode="after")
    def _prompt(self) -> JobSpec:
        if self.input.format != "openai_batch":
            if self.prompt is None:
                raise ValueError(_PROMPT_REQUIRED)
            return self
        problems = []
        if self.prompt is not None:
            problems.append("prompt (each line's messages or prompt is the prompt: remove the prompt section)")
        if self.input.id not in (None, "custom_id"):
            problems.append("input.id (the id is the lines' custom_id)")
        if self.mode != "generate":
            problems.append("mode: batchprompt")
        named = [f"sampling.{k}" for k in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
                 if self.sampling.column(k)]
        if named or (self.sampling.constraint is not None and self.sampling.constraint.kind == "column"):
            problems.append(f"{', '.join(named) or 'sampling.constraint.column'} naming a column (each line's body "
                            "gives its own settings; the spec's sampling gives the defaults)")
        if problems:
            raise ValueError(f"input.format openai_batch does not take {'; '.join(problems)}")
        return self

    @model_validator(mode="after")
    def _mode(self) -> JobSpec:
        if self.mode == "generate":
            if self.batchprompt is not None:
                raise ValueError("a batchprompt section needs mode: batchprompt")
            return self
        if self.batchprompt is None:
            raise ValueError("mode: batchprompt needs a batchprompt section (at least its instruction; labels for "
                             "the inline layout)")
        s = self.sampling
        problems = [name for name, bad in (
            ("sampling.constraint", s.constraint is not None), ("sampling.n", s.n != 1),
            ("sampling.logprobs", s.logprobs is not None), ("sampling.temperature", s.temperature != 0),
            ("sampling.stop", bool(s.stop)), ("sampling.ignore_eos", s.ignore_eos)) if bad]
        if problems:
            raise ValueError(f"mode: batchprompt does not take {', '.join(problems)} (answers are greedy and "
                             "constrained by the mode itself)")
        if self.engine.devices is not None or self.engine.executor == "ray":
            raise ValueError("mode: batchprompt runs on one device: remove engine.devices and engine.executor")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """A stable hash of the whole normalised spec (defaults filled in)."""
        return _hash(self.to_dict())

    def results_hash(self) -> str:
        """A hash of what decides the result rows (not where they go, nor how fast they are made)."""
        d = self.to_dict()
        if d["model"]["load"] == "weights":  # (as before random weights existed: old outputs still resume)
            d["model"] = {k: v for k, v in d["model"].items() if k not in ("load", "size", "seed")}
        if d["sampling"]["constraint"] is None:  # (likewise for jobs without a constraint)
            d["sampling"] = {k: v for k, v in d["sampling"].items() if k != "constraint"}
        if d["sampling"]["n"] == 1:  # (and for one sample per row)
            d["sampling"] = {k: v for k, v in d["sampling"].items() if k != "n"}
        if d["sampling"]["logprobs"] is None:  # (and without log-probabilities)
            d["sampling"] = {k: v for k, v in d["sampling"].items() if k != "logprobs"}
        keys = ("model", "input", "prompt", "sampling") + (("mode", "batchprompt") if self.mode != "generate" else ())
        return _hash({k: d[k] for k in keys})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job file, apply ``--set a.b=value`` overrides, validate. Raises SpecError listing every
    problem (exit 78), or UsageError for a malformed override (exit 2)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read job file {path}: {e}") from None
    raw = parse_yaml(text, str(path))
    raw.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-") or "job")
    for item in overrides:
        apply_override(raw, item)
    return validate_dict(raw, source=str(path))


PATTERN_HINTS = {
    _IDENT: "must be an identifier (letters, digits, _; not starting with a digit)",
    _DEVICE: "must be auto, cpu, cuda or cuda:N",
}


def validate_dict(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        problems = [p for p in (describe(err, JobSpec, PATTERN_HINTS) for err in e.errors(include_url=False))
                    if _PROMPT_REQUIRED not in p]
        if _needs_prompt(raw) and "prompt: required" not in problems:  # (reported with the other fields)
            order = list(JobSpec.model_fields)
            at = next((i for i, p in enumerate(problems) if p.split(".")[0].split(":")[0] in order
                       and order.index(p.split(".")[0].split(":")[0]) > order.index("prompt")), len(problems))
            problems.insert(at, "prompt: required")
        raise SpecError(f"{source}: {len(problems)} problem(s) in the job spec", problems) from None


_PROMPT_REQUIRED = "prompt section required"  # (the validator's message: reported as "prompt: required")


def _needs_prompt(raw: Any) -> bool:
    """A spec without a prompt section that needs one (any input but an OpenAI batch file)."""
    if not isinstance(raw, dict) or raw.get("prompt") is not None:
        return False
    fmt = raw.get("input", {}).get("format") if isinstance(raw.get("input"), dict) else None
    return fmt != "openai_batch"
