"""Build the example input table examples/data/reviews.parquet.

Deterministic (fixed seed, no clock, no network); needs only the stdlib and
pyarrow.  Run from anywhere:

    python examples/make_reviews.py

English reviews are composed from 1-3 hand-written sentences about concrete
aspects of one product, all of the same sentiment (a positive review may carry
one clearly minor complaint, a negative one a clearly grudging compliment), so
the gold label stays unambiguous.  A handful of German and French reviews are
written out in full so that `WHERE lang = 'en'` filters something.  The
sentences live in examples/review_phrases.py (imported from this script's
folder); this script holds the composing rules.
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from review_phrases import CAVEAT, FOREIGN, GENERIC, PRODUCTS

OUT = Path(__file__).resolve().parent / "data" / "reviews.parquet"
N_EN = {"positive": 108, "negative": 96, "neutral": 36}  # 240 English rows

# Review shapes: P = product sentence, G = generic sentence, C = caveat.
SHAPES = {
    "positive": [("P",), ("P", "P"), ("P", "G"), ("P", "P", "G"), ("P", "C"), ("G", "P")],
    "negative": [("P",), ("P", "P"), ("P", "G"), ("P", "P", "G"), ("C", "P"), ("P", "C")],
    "neutral": [("P",), ("P", "G"), ("P", "P"), ("G", "P")],
}
SHAPE_WEIGHTS = {"positive": [3, 4, 4, 2, 2, 1], "negative": [3, 4, 4, 2, 2, 1], "neutral": [2, 4, 2, 1]}
LABEL_IX = {"positive": 0, "negative": 1, "neutral": 2}


class Deck:
    """Draw items in shuffled rounds so every sentence gets used about equally."""

    def __init__(self, items: list[str], rng: random.Random):
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self, avoid: list[str]) -> str:
        for _ in range(2 * len(self.items) + 2):
            if not self.pile:
                self.pile = self.items[:]
                self.rng.shuffle(self.pile)
            s = self.pile.pop()
            if s not in avoid:
                return s
        raise RuntimeError("could not draw a distinct sentence")


def build() -> list[dict]:
    rng = random.Random(7)
    decks: dict[tuple, Deck] = {}

    def deck(key: tuple, items: list[str]) -> Deck:
        if key not in decks:
            decks[key] = Deck(items, rng)
        return decks[key]

    rows, seen = [], set()
    for label, n in N_EN.items():
        products = sorted(PRODUCTS)
        rng.shuffle(products)
        for i in range(n):
            product = products[i % len(products)]
            for _ in range(100):
                shape = rng.choices(SHAPES[label], SHAPE_WEIGHTS[label])[0]
                parts: list[str] = []
                for kind in shape:
                    if kind == "P":
                        pool = PRODUCTS[product][LABEL_IX[label]]
                        parts.append(deck((product, label), pool).draw(parts))
                    elif kind == "G":
                        parts.append(deck(("G", label), GENERIC[label]).draw(parts))
                    else:
                        parts.append(deck(("C", label), CAVEAT[label]).draw(parts))
                text = " ".join(parts)
                if text not in seen and 10 <= len(text.split()) <= 60:
                    break
            else:
                raise RuntimeError(f"no unique review for {product}/{label}")
            seen.add(text)
            rows.append({"product": product, "lang": "en", "text": text, "label": label})
    for lang, product, label, text in FOREIGN:
        assert text not in seen and 10 <= len(text.split()) <= 60, text
        seen.add(text)
        rows.append({"product": product, "lang": lang, "text": text, "label": label})

    rng.shuffle(rows)
    for i, row in enumerate(rows, start=1):
        row["review_id"] = f"r{i:04d}"
        row["max_new"] = 3 + zlib.crc32(row["review_id"].encode()) % 6  # 3..8
    return rows


SCHEMA = pa.schema([
    ("review_id", pa.string()),
    ("product", pa.string()),
    ("lang", pa.string()),
    ("text", pa.string()),
    ("label", pa.string()),
    ("max_new", pa.int32()),
])


def main() -> None:
    rows = build()
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, OUT, compression="zstd")
    print(f"wrote {table.num_rows} rows to {OUT}")


if __name__ == "__main__":
    main()
