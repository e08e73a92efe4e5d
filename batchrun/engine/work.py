"""The scheduler's own state objects: a computation in progress and a request's life (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchrun.engine.blocks import Segment
from batchrun.engine.requests import Request
from batchrun.engine.step import RowKey


@dataclass
class Pending:
    """Tokens still to compute for a request or a shared prefix (prefill, maybe over several steps)."""

    tokens: list[int]
    start_pos: int
    done: int = 0


@dataclass
class RowState:
    req: Request
    own_start: int  # where its own tokens start (after its shared prefixes)
    chain: list[int]  # shared prefixes, outermost first
    key: RowKey  # (made once: a step names the row in each of its works)
    own: Segment = field(default_factory=Segment)
    generated: list[int] = field(default_factory=list)  # its output tokens known so far
    # Tokens drawn in steps that were launched but whose ids are not known on the host yet: placeholders
    # (``engine.step.placeholder``), oldest first; they follow ``generated``.
    inflight: list[int] = field(default_factory=list)
    running: bool = False  # holds KV
    started: bool = False  # its pack item was taken
    done: bool = False  # finished or failed: nothing more comes of it
    order: int = 0  # admission counter (the newest is preempted first)

    @property
    def output_len(self) -> int:
        """Its output tokens, drawn ones not known yet included."""
        return len(self.generated) + len(self.inflight)

    @property
    def own_tokens(self) -> int:
        return len(self.req.prompt_ids) - self.own_start + self.output_len
