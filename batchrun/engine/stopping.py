"""When generation stops and what text it leaves: EOS, stop strings, max_tokens (no torch here).

The only place that detokenizes while generating. Engines call ``hit`` while decoding (a cheap check on the
tail of a row) and ``finish`` once per row to cut the tokens and the text exactly: the text ends before the
first stop string, and the tokens end with the token that completed it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from batchrun.engine.requests import Completion


class Stopper:
    def __init__(self, tokenizer: Any, stop: Iterable[str], eos_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        # A stop string of n characters spans at most about 4n byte-level tokens; check that many.
        self._tail = 4 * max((len(s) for s in self.stop), default=0) + 2

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def hit(self, generated: Sequence[int]) -> bool:
        """True if ``generated`` (no EOS) already contains a stop string near its end."""
        if not self.stop or not generated:
            return False
        tail = self.decode(generated[-self._tail :])
        return any(s in tail for s in self.stop)

    def finish(self, key: Hashable, generated: Sequence[int], max_tokens: int) -> Completion:
        """Cut a row's raw generated ids (possibly with EOS and padding after it) into its Completion."""
        ids: list[int] = []
        reason = "length"
        for t in generated[:max_tokens]:
            if t in self.eos_ids:
                reason = "stop"
                break
            ids.append(int(t))
        text = self.decode(ids)
        cut = self._first_stop(text)
        if cut is not None:
            # The fewest tokens whose text already holds the stop string.
            k = next(k for k in range(1, len(ids) + 1) if self._first_stop(self.decode(ids[:k])) is not None)
            ids, text, reason = ids[:k], text[:cut], "stop"
        return Completion(key=key, token_ids=ids, text=text, finish_reason=reason)

    def _first_stop(self, text: str) -> int | None:
        found = [p for p in (text.find(s) for s in self.stop) if p >= 0]
        return min(found) if found else None
