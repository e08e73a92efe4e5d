"""batchrun.io.shared_tokens: texts sharing long beginnings tokenize each beginning once and give exactly the
ids of tokenizing every text whole (the real SmolLM2 tokenizer), at every level of sharing; a tokenizer it
cannot reason about, or a group whose check fails, is tokenized whole."""

from __future__ import annotations

import pytest

from batchrun.io import shared_tokens
from batchrun.io.shared_tokens import encode_shared

SYSTEM = "<|im_start|>system\nYou are a careful grader. Answer with one word.  Examples follow.\n" * 12
SHOTS = "".join(f"<|im_start|>user\nReview {i}: the kettle — ünïcödé 東京 🚀, 1234567 \t tabs,  spaces.\n"
                f"<|im_end|>\n<|im_start|>assistant\nlabel{i % 3}<|im_end|>\n" for i in range(20))
DOCS = [f"Document {d}: " + " ".join(f"word{d}{w}" for w in range(300)) + "\n\n" for d in range(3)]


def _texts() -> list[str]:
    texts = [SYSTEM + SHOTS + f"<|im_start|>user\nRow {i}: {'why? ' * (i % 4)}ok<|im_end|>\n" for i in range(12)]
    texts += [SYSTEM + doc + q for doc in DOCS for q in ("Question: what?", "Q:  2+2=", "x", "x")]  # (repeats)
    texts += ["a short one", "", "   ", SYSTEM[:700], SYSTEM[:701] + "!"]  # (a text that begins another)
    texts += ["Unrelated " * 80 + str(i) for i in range(3)]
    return texts


@pytest.fixture(scope="module")
def backend(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir).backend_tokenizer


def _whole(backend, special: bool):
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]


@pytest.mark.parametrize("special", [True, False])
def test_shared_beginnings_give_exactly_the_whole_texts_ids(backend, special, monkeypatch):
    """The few-shot rows, the documents' rows under the system prompt, and each document's rows again under
    it: the same ids as every text tokenized whole, with well under half the characters tokenized."""
    texts = _texts()
    read = []  # characters each call to the tokenizer reads
    whole = _whole(backend, special)
    plain = shared_tokens.encode_plain
    monkeypatch.setattr(shared_tokens, "encode_plain", lambda b, t: read.append(sum(map(len, t))) or plain(b, t))
    got = encode_shared(backend, texts, special, lambda t: read.append(sum(map(len, t))) or whole(t))
    assert got == whole(texts)
    assert sum(read) < 0.5 * sum(map(len, texts))
    groups = shared_tokens._groups(texts)  # (the system prompt's run, with the text that begins another; Unrelated)
    assert sorted(len(rows) for rows, _ in groups) == [3, 12 + 12 + 2]


def test_a_tokenizer_it_cannot_reason_about_is_tokenized_whole(backend):
    """A prefix space (or a normalizer) can change how the rest of a text tokenizes: such a tokenizer takes
    the plain path."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.pre_tokenizers import ByteLevel

    spaced = Tokenizer.from_str(backend.to_str())
    spaced.pre_tokenizer = ByteLevel(add_prefix_space=True)
    lowered = Tokenizer.from_str(backend.to_str())
    lowered.normalizer = normalizers.Lowercase()
    texts = _texts()
    for other in (spaced, lowered):
        seen = []
        whole = _whole(other, True)
        got = encode_shared(other, texts, True, lambda t, s=seen, w=whole: s.append(list(t)) or w(t))
        assert got == whole(texts) and seen == [texts]
    assert shared_tokens._eligible(backend)


def test_a_group_whose_check_fails_is_tokenized_whole(backend, monkeypatch):
    """Each group's first and last rows are also tokenized whole; a difference (here forced: the rests'
    tokens altered) sends the whole group through the plain path, and the ids stay exact."""
    texts = _texts()
    whole = _whole(backend, False)
    monkeypatch.setattr(shared_tokens, "encode_plain", lambda b, t: [[0] for _ in t])
    assert encode_shared(backend, texts, False, whole) == whole(texts)


def test_common_beginning_lengths():
    assert [shared_tokens._common(a, b) for a, b in [("", "x"), ("abc", "abd"), ("a" * 1000, "a" * 1000),
                                                     ("a" * 700 + "b", "a" * 700 + "c"), ("ab" * 90, "ab" * 64)]] \
        == [0, 2, 1000, 700, 128]


@pytest.mark.parametrize("depth", [8, 1])
def test_rows_that_each_extend_the_one_before(backend, depth, monkeypatch):
    """A conversation growing turn by turn, a row per turn: every row begins with the one before it, so each
    level of grouping would peel one row off; the levels stop at ``MAX_DEPTH`` and the ids stay exact."""
    monkeypatch.setattr(shared_tokens, "MAX_DEPTH", depth)
    turns = [f"<|im_start|>user\nTurn {k}: " + "tell me more about the kettle, " * 20 + "<|im_end|>\n"
             for k in range(40)]
    texts = ["".join(turns[: k + 1]) for k in range(40)][::-1]
    whole = _whole(backend, True)
    assert encode_shared(backend, texts, True, whole) == whole(texts)
