"""Build examples/data/labeled_sentiment.parquet: 240 short product reviews with a gold label (positive or
negative), for BatchPrompt's evaluation (``benchmarks/batchprompt_eval.py``).

Deterministic (fixed seed, no clock, no network); stdlib and pyarrow. Each review is a product named in an
opening line of its sentiment and one detail sentence of the same sentiment, so the label is unambiguous.
None of the sentences appear in examples/data/reviews.parquet.

    python examples/make_labeled.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "data" / "labeled_sentiment.parquet"
N = 240

PRODUCTS = ["desk lamp", "rain jacket", "blender", "office chair", "phone case", "hiking boots", "coffee grinder",
            "backpack", "keyboard", "water bottle", "electric kettle", "yoga mat"]
OPENERS = {
    "positive": ["I am really pleased with this {p}.", "This {p} turned out to be a great buy.",
                 "Very happy with the {p} so far.", "The {p} exceeded what I hoped for.",
                 "Glad I picked this {p}."],
    "negative": ["I regret buying this {p}.", "This {p} was a waste of money.", "Very disappointed with the {p}.",
                 "The {p} fell far short of what I hoped for.", "I would not pick this {p} again."],
}
DETAILS = {
    "positive": ["It feels solid and well made.", "Setup took two minutes and it just works.",
                 "It looks even nicer in person.", "Everyone in the family likes using it.",
                 "The quality is excellent for the price.", "It has held up perfectly after months of use.",
                 "Shipping was quick and it arrived in perfect shape.", "It does exactly what it promises.",
                 "I use it every day and it never lets me down.", "Highly recommended to anyone looking."],
    "negative": ["It started falling apart within a week.", "The parts feel cheap and flimsy.",
                 "It stopped working after a few days.", "Customer support never answered my emails.",
                 "It arrived broken and the return was a hassle.", "It is much smaller than the pictures suggest.",
                 "The finish peeled off almost right away.", "It makes an annoying noise all the time.",
                 "Nothing about it works the way it should.", "I am sending it back for a refund."],
}


def build() -> pa.Table:
    rng = random.Random(20261129)
    rows = []
    for label in ("positive", "negative"):  # N / 2 distinct reviews of each label
        combos = [(o, d, p) for o in OPENERS[label] for d in DETAILS[label] for p in PRODUCTS]
        rows += [(o.format(p=p) + " " + d, label) for o, d, p in rng.sample(combos, N // 2)]
    rng.shuffle(rows)
    return pa.table({"id": list(range(N)), "text": [t for t, _ in rows], "label": [lab for _, lab in rows]})


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(build(), OUT)
    print(f"wrote {N} rows to {OUT}")
