"""The contract between batchrun and an engine: the plain objects it takes and gives back (no torch here).

An engine gets ``Request``s (token ids, per-request limits, seed, and optionally its own sampling settings)
and yields ``Completion``s as requests finish. A request's ``key`` is opaque to the engine: whoever builds the
requests (the result assembler) decides what it means — an input row, a (row, sample) pair, or later a
BatchPrompt round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings: an engine's defaults, or one request's (``Request.sampling``). Per-request limits
    (max_tokens, seed) live on the Request."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # (job-wide) report each chosen token's log-probability and this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@runtime_checkable
class LogitsConstraint(Protocol):
    """A per-request restriction of the next token (a grammar, a choice list, a BatchPrompt label slot).

    Both engines call it before every token of the request is chosen, with the tokens generated so far, and
    only the tokens it returns can be chosen (greedy or sampled): token ids, or a boolean mask over the
    vocabulary (a numpy array). ``None`` means no restriction at this position. It must allow some token.
    """

    def allowed_tokens(self, generated: Sequence[int]) -> Sequence[int] | Any | None: ...


@dataclass(frozen=True)
class Request:
    key: Hashable  # opaque to the engine; echoed in the Completion
    prompt_ids: list[int]
    max_tokens: int
    seed: int = 0  # per-request seed, e.g. row_seed(job seed, row id)
    constraint: LogitsConstraint | None = field(default=None, compare=False)
    # This request's temperature, top_p, top_k and stop strings (None: the engine's). ignore_eos stays the
    # engine's: it is job-wide.
    sampling: SamplingParams | None = None


@dataclass(frozen=True)
class Completion:
    key: Hashable  # the Request's key
    token_ids: list[int] = field(repr=False)  # generated tokens, EOS excluded, cut after a stop string
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens reached), "error"
    error: str | None = None  # why the request failed (it could not fit the KV budget, say)
    # With SamplingParams.logprobs: per token of token_ids, its log-probability under the model (raw logits:
    # before temperature, top-k/p or a constraint), and the most likely tokens there as (id, text, logprob).
    logprobs: list[float] | None = field(default=None, repr=False)
    top_logprobs: list[list[tuple[int, str, float]]] | None = field(default=None, repr=False)
    token_texts: list[str] | None = field(default=None, repr=False)  # (with logprobs: each token's text)
    choice_probs: dict[str, float] | None = None  # under a choices constraint: each choice's probability


class Interrupted(Exception):
    """Raised inside an engine when ``interrupt`` asks it to stop mid-computation; the engine's ``run`` catches
    it and ends (the work in flight is dropped and recomputed on resume)."""


class Engine(Protocol):
    """What the job runner needs of an engine (batchrun's ``BatchEngine``, the ``ReferenceEngine``)."""

    name: str
    stats: dict[str, Any]  # counters of the last run (steps, preemptions, KV peak, ...)

    def run(self, requests: Sequence[Request], plan: Any,
            interrupt: Callable[[], bool] | None = None) -> Iterator[list[Completion]]:
        """Run every request (``plan`` was built over ``requests``, in this order); yield finished ones as
        they finish. ``interrupt`` is polled while the engine computes; when it returns True the run ends
        promptly, dropping the work in flight (those requests are simply not yielded)."""
        ...


def row_seed(job_seed: int, row_id: object) -> int:
    """A 63-bit seed that depends only on the job's seed and the row's id, never on batch position."""
    digest = hashlib.sha256(f"{job_seed}\x00{type(row_id).__name__}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` (0, 1, ...) of a row whose seed is ``seed`` (its ``row_seed``): sample 0
    keeps the row's seed, so the first of n samples is the row's output with n = 1."""
    if sample == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x00sample\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
