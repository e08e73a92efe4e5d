"""When generation stops and what text it leaves: EOS, stop strings, max_tokens (no torch here).

The only place that detokenizes while generating. Engines call ``hit`` while decoding (a cheap check on the
tail of a row) and ``finish`` once per row to cut the tokens and the text exactly: the text ends before the
first stop string, and the tokens end with the token that completed it. Stop strings are per request: each
call takes the request's own (``stop``), or the engine's defaults given here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from batchrun.engine.requests import Completion


class Stopper:
    def __init__(self, tokenizer: Any, stop: Iterable[str], eos_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)  # the default stop strings, for requests without their own
        self.eos_ids = frozenset(eos_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def hit(self, generated: Sequence[int], stop: Sequence[str] | None = None) -> bool:
        """True if ``generated`` (no EOS) already contains a stop string near its end."""
        stop = self.stop if stop is None else stop
        if not stop or not generated:
            return False
        # A stop string of n characters spans at most about 4n byte-level tokens; check that many.
        tail = self.decode(generated[-(4 * max(len(s) for s in stop) + 2) :])
        return any(s in tail for s in stop)

    def finish(self, key: Hashable, generated: Sequence[int], max_tokens: int,
               stop: Sequence[str] | None = None) -> Completion:
        """Cut a row's raw generated ids (possibly with EOS and padding after it) into its Completion."""
        stop = self.stop if stop is None else stop
        ids: list[int] = []
        reason = "length"
        for t in generated[:max_tokens]:
            if t in self.eos_ids:
                reason = "stop"
                break
            ids.append(int(t))
        text = self.decode(ids)
        cut = _first_stop(text, stop)
        if cut is not None:
            # The fewest tokens whose text already holds the stop string.
            k = next(k for k in range(1, len(ids) + 1) if _first_stop(self.decode(ids[:k]), stop) is not None)
            ids, text, reason = ids[:k], text[:cut], "stop"
        return Completion(key=key, token_ids=ids, text=text, finish_reason=reason)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [p for p in (text.find(s) for s in stop) if p >= 0]
    return min(found) if found else None
