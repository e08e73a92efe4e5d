"""The scheduler's own state objects: a computation in progress and a request's life (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchrun.engine.blocks import Segment
from batchrun.engine.requests import Request


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
    own: Segment = field(default_factory=Segment)
    generated: list[int] = field(default_factory=list)
    running: bool = False  # holds KV
    started: bool = False  # its pack item was taken
    order: int = 0  # admission counter (the newest is preempted first)

    @property
    def own_tokens(self) -> int:
        return len(self.req.prompt_ids) - self.own_start + len(self.generated)
