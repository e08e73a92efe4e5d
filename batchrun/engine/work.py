"""The scheduler's plain state objects: one step's work for a sequence, a pending computation, a row.

No torch here; the runner reads ``Work``, the scheduler owns ``Job`` and ``RowState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchrun.engine.blocks import Segment
from batchrun.engine.requests import Request


@dataclass
class Work:
    """One sequence's part of a step."""

    key: int  # the row (index into the requests), or -1 - p for shared prefix p
    tokens: list[int]
    start_pos: int  # position of tokens[0]
    # Every segment it attends to, outermost first (its own last, holding the new tokens), with the number of
    # tokens it sees in each: a snapshot, since a later chunk of the same row may grow the segment this step.
    context: list[tuple[Segment, int]]
    slots: list[int]  # pool slots of the new tokens
    sample: bool  # a next token is drawn from its last position
    decode: bool = False  # the one new token is the row's last output


@dataclass
class Job:
    """Tokens still to compute for a row or a shared prefix."""

    tokens: list[int]
    start_pos: int
    done: int = 0


@dataclass
class RowState:
    req: Request
    own_start: int
    chain: list[int]  # shared prefixes, outermost first
    own: Segment = field(default_factory=Segment)
    generated: list[int] = field(default_factory=list)
    running: bool = False  # holds KV
    started: bool = False  # its pack item was taken
    order: int = 0  # admission counter (the newest is preempted first)

    @property
    def own_tokens(self) -> int:
        return len(self.req.prompt_ids) - self.own_start + len(self.generated)
