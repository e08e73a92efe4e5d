"""The plain objects an engine takes and gives back (no torch here).

An engine gets ``Request``s (token ids and per-row limits) and yields ``Completion``s as rows finish.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Job-wide decoding settings (per-row limits live on the Request)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    index: int  # the row's position in the job's input table
    prompt_ids: list[int]
    max_tokens: int
    seed: int = 0  # per-row seed, from row_seed(job seed, row id)


@dataclass(frozen=True)
class Completion:
    index: int
    token_ids: list[int] = field(repr=False)  # generated tokens, EOS excluded, cut after a stop string
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens reached), "error"
    error: str | None = None  # why the row failed (it could not fit the KV budget, say)


def row_seed(job_seed: int, row_id: object) -> int:
    """A 63-bit seed that depends only on the job's seed and the row's id, never on batch position."""
    digest = hashlib.sha256(f"{job_seed}\x00{type(row_id).__name__}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
