"""Preprocessing rules, the character vocabulary, and per-document train/validation/test splits.

Rules (what d2l does to The Time Machine, so its numbers can be reproduced):
  d2l        d2l 1.0: re.sub('[^A-Za-z]+', ' ', text).lower() on the whole text
             (The Time Machine: 173,428 characters over 27 symbols).
  d2l_lines  d2l 0.17: the same rule per line, stripped, lines joined with nothing, which glues
             the last word of a line to the first of the next (170,580 characters).
  raw        every character kept.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from deeprnn.config import CHOICES, check_split
from deeprnn.errors import UsageError

PREPROCESS_RULES = CHOICES["preprocess"]
UNK_ID = 0  # Vocab's first entry: every character outside the vocabulary
SPLIT_NAMES = ("train", "validation", "test")
HELD_OUT_SPLITS = ("validation", "test")

_NON_LETTERS = re.compile("[^A-Za-z]+")


def preprocess(text: str, rule: str) -> str:
    """Applies one of PREPROCESS_RULES to a whole document."""
    if rule == "d2l":
        return _NON_LETTERS.sub(" ", text).lower()
    if rule == "d2l_lines":
        # d2l 0.17 reads with open().readlines(): universal newlines, so "\r\n" and "\r" end
        # lines too, but str.splitlines() would also split on \x0b, \x0c, \u2028 ..., which
        # readlines() does not.
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "".join(_NON_LETTERS.sub(" ", line).strip().lower() for line in lines)
    if rule == "raw":
        return text
    raise UsageError(f"unknown preprocess rule {rule!r}; use one of {', '.join(PREPROCESS_RULES)}")


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of `text` as uint32, without a Python loop over characters."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocab:
    """Characters to ids: index 0 is <unk>, then characters by descending frequency (ties by
    character, so the same text always gives the same ids)."""

    UNK = "<unk>"

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if not tokens or tokens[0] != self.UNK:
            raise UsageError(f"a vocabulary must start with {self.UNK!r}; got {tokens[:1]!r}")
        chars = tokens[1:]
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise UsageError("vocabulary entries after <unk> must be distinct single characters")
        self.tokens = tokens
        # Sorted code points + their ids: encode() maps a whole text with one searchsorted.
        points = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(points)
        self._sorted_points = points[order]
        self._sorted_ids = (order + 1).astype(np.int32)
        self._token_array = np.array(tokens, dtype=object)

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocab:
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        chars = sorted(counts, key=lambda c: (-counts[c], c))
        return cls([cls.UNK, *chars])

    @property
    def size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of every character; characters outside the vocabulary become 0 (<unk>)."""
        points = _code_points(text)
        if len(self._sorted_points) == 0:
            return np.zeros(len(points), dtype=np.int32)
        where = np.searchsorted(self._sorted_points, points)
        where = np.minimum(where, len(self._sorted_points) - 1)
        known = self._sorted_points[where] == points
        return np.where(known, self._sorted_ids[where], UNK_ID).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise UsageError(f"token id out of range for a vocabulary of {self.size}")
        return "".join(self._token_array[ids])

    def to_json(self) -> str:
        return json.dumps({"format": "deeprnn.vocab/1", "tokens": self.tokens}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        try:
            tokens = json.loads(s)["tokens"]
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"not a deeprnn vocabulary file ({e}); use a run's vocab.json") from e
        return cls(tokens)


@dataclass
class Splits:
    """Token ids, one flat int32 array per split (documents split on their own, concatenated)."""

    vocab: Vocab
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    # Per document: name, author, title, sha256, characters, characters_per_split.
    documents: list[dict] = field(default_factory=list)
    unk_rate: dict[str, float] = field(default_factory=dict)  # non-empty held-out splits only


def _split_bounds(length: int, split: tuple[float, float, float]) -> tuple[int, int]:
    """Cut points of one document: [0, a) train, [a, b) validation, [b, length) test."""
    a = int(round(length * split[0]))
    b = int(round(length * (split[0] + split[1])))
    return min(a, length), min(max(a, b), length)


def build_splits(documents, preprocess_rule: str = "d2l",
                 split: Sequence[float] = (0.9, 0.05, 0.05), max_tokens: int | None = None,
                 vocab: Vocab | None = None) -> Splits:
    """Preprocesses each document, cuts it into contiguous train/validation/test parts, builds
    (or reuses) the vocabulary from the training parts, and encodes every split.

    Each document is split on its own so that no book's test text lands in training;
    max_tokens (d2l mode) keeps the first N characters of the preprocessed corpus.
    """
    split = check_split(split)
    if preprocess_rule not in PREPROCESS_RULES:
        preprocess(" ", preprocess_rule)  # raises the UsageError naming the rules
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max_tokens={max_tokens} must be positive (or unset for all)")
    if not documents:
        raise UsageError("no documents given; pass a corpus spec such as --corpus=time_machine")

    texts, remaining = [], max_tokens
    for doc in documents:
        text = preprocess(doc.text, preprocess_rule)
        if not text.strip():
            raise UsageError(f"corpus {doc.name!r} is empty after --preprocess={preprocess_rule}")
        if remaining is not None:
            text, remaining = text[:remaining], remaining - min(remaining, len(text))
        texts.append(text)

    parts = {name: [] for name in SPLIT_NAMES}
    records = []
    for doc, text in zip(documents, texts, strict=True):
        a, b = _split_bounds(len(text), split)
        pieces = dict(zip(SPLIT_NAMES, (text[:a], text[a:b], text[b:]), strict=True))
        for name, piece in pieces.items():
            parts[name].append(piece)
        records.append({"name": doc.name, "author": doc.author, "title": doc.title,
                        "sha256": doc.sha256, "characters": len(text),
                        "characters_per_split": {k: len(v) for k, v in pieces.items()}})

    if vocab is None:
        if not any(parts["train"]):
            raise UsageError("no training text to build a vocabulary from; give a train fraction"
                             " > 0 or reuse a saved vocabulary")
        vocab = Vocab.build(parts["train"])
    encoded = {name: vocab.encode("".join(pieces)) for name, pieces in parts.items()}
    unk_rate = {name: float(np.mean(encoded[name] == UNK_ID))
                for name in HELD_OUT_SPLITS if len(encoded[name])}
    return Splits(vocab=vocab, train=encoded["train"], validation=encoded["validation"],
                  test=encoded["test"], documents=records, unk_rate=unk_rate)
