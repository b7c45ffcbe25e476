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
from collections.abc import Iterable, Iterator, Sequence
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


# Texts are counted and encoded this many characters at a time: a 100M-character corpus
# (text8, enwik8) then needs a few MB of temporaries besides its ids, not 4-12 bytes per
# character (UTF-32 code points, int64 search positions) of the whole text at once.
CHUNK_CHARS = 1 << 20


def _pieces(text: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """text[start:stop] as slices of at most CHUNK_CHARS characters (each a small copy)."""
    stop = len(text) if stop is None else stop
    for first in range(start, stop, CHUNK_CHARS):
        yield text[first: min(first + CHUNK_CHARS, stop)]


def _latin1_codes(piece: str) -> np.ndarray | None:
    """The piece's code points as uint8 when all are below 256 (ASCII text, text8, enwik8's
    bytes read as latin-1): one byte a character, and a 256-entry table maps them. None when
    the piece holds any other character."""
    try:
        return np.frombuffer(piece.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        return None


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of `text` as uint32, without a Python loop over characters."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def count_characters(texts: Iterable[str]) -> dict[str, int]:
    """How often each character occurs in `texts`, counted CHUNK_CHARS at a time with NumPy
    (a Counter hashes every character: seconds for 90M)."""
    low = np.zeros(256, dtype=np.int64)  # code points below 256, the common case
    high: dict[int, int] = {}
    for text in texts:
        for piece in _pieces(text):
            codes = _latin1_codes(piece)
            if codes is not None:
                low += np.bincount(codes, minlength=256)
                continue
            points, counts = np.unique(_code_points(piece), return_counts=True)
            for point, count in zip(points.tolist(), counts.tolist(), strict=True):
                high[point] = high.get(point, 0) + count
    for point in np.flatnonzero(low).tolist():
        high[point] = high.get(point, 0) + int(low[point])
    return {chr(point): count for point, count in high.items()}


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
        # ids of the code points below 256 (<unk> for those not in the vocabulary): the
        # one-byte-a-character fast path of encode.
        self._byte_ids = np.full(256, UNK_ID, dtype=np.int32)
        low = self._sorted_points < 256
        self._byte_ids[self._sorted_points[low]] = self._sorted_ids[low]
        self._token_array = np.array(tokens, dtype=object)

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocab:
        counts = count_characters(texts)
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
        ids = np.empty(len(text), dtype=np.int32)
        self.encode_into(text, 0, len(text), ids)
        return ids

    def encode_into(self, text: str, start: int, stop: int, out: np.ndarray) -> None:
        """Writes the ids of text[start:stop] into `out` (int32, stop - start long), a piece
        at a time: no copy of the text and no full-size temporaries."""
        for first, piece in zip(range(0, stop - start, CHUNK_CHARS), _pieces(text, start, stop),
                                strict=True):
            self._encode_piece(piece, out[first: first + len(piece)])

    def _encode_piece(self, piece: str, out: np.ndarray) -> None:
        codes = _latin1_codes(piece)
        if codes is not None:
            np.take(self._byte_ids, codes, out=out, mode="clip")  # codes < 256: no checks
            return
        points = _code_points(piece)
        if len(self._sorted_points) == 0:
            out[:] = UNK_ID
            return
        where = np.searchsorted(self._sorted_points, points)
        where = np.minimum(where, len(self._sorted_points) - 1)
        known = self._sorted_points[where] == points
        out[:] = np.where(known, self._sorted_ids[where], UNK_ID)

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


DEFAULT_SPLIT = (0.9, 0.05, 0.05)  # RunConfig's --split
WHOLE_TEXT = (1.0, 0.0, 0.0)


def check_standard_split(name: str, split_at: tuple[int, int], length: int,
                         preprocess_rule: str, split, max_tokens: int | None) -> None:
    """A benchmark with a standard split (text8, enwik8: deeprnn/data/benchmarks.py) is scored
    only on that split, so that its numbers compare with published ones: --split stays at its
    default (which then means the standard cut) or 1,0,0 (all of it as training text, what
    `evaluate --split=all` asks); --max_tokens stays unset; and its symbols are not
    preprocessed."""
    a, b = split_at
    if preprocess_rule != "raw":
        raise UsageError(f"{name} is read as its own symbols, never preprocessed, and needs "
                         f"--preprocess=raw (not {preprocess_rule}); train with "
                         "--preprocess=raw to use it")
    if tuple(split) not in (DEFAULT_SPLIT, WHOLE_TEXT):
        fractions = ",".join(f"{f:g}" for f in split)
        raise UsageError(f"--split={fractions} does not apply to {name}, which has the standard"
                         f" split (first {a:,} / next {b - a:,} / last {length - b:,} "
                         "characters); leave --split at its default 0.9,0.05,0.05, or use "
                         "1,0,0 for the whole text as training text")
    if max_tokens is not None:
        raise UsageError(f"--max_tokens={max_tokens} does not apply to {name}, whose standard "
                         "split is fixed; leave it unset (0) and shorten the run with "
                         "--num_train_steps")


def _document_bounds(document, length: int, split) -> tuple[int, int]:
    split_at = getattr(document, "split_at", None)
    if split_at is None:
        return _split_bounds(length, split)
    return (length, length) if tuple(split) == WHOLE_TEXT else tuple(split_at)


def build_splits(documents, preprocess_rule: str = "d2l",
                 split: Sequence[float] = DEFAULT_SPLIT, max_tokens: int | None = None,
                 vocab: Vocab | None = None) -> Splits:
    """Preprocesses each document, cuts it into contiguous train/validation/test parts, builds
    (or reuses) the vocabulary from the training parts, and encodes every split.

    Each document is split on its own so that no book's test text lands in training;
    max_tokens (d2l mode) keeps the first N characters of the preprocessed corpus. A document
    with a standard split (`split_at`: text8, enwik8) is cut there instead, and refuses the
    flags that would change it (check_standard_split).

    Scales to 100M-character documents: the parts are never copied out of the text; counting
    and encoding read it a chunk at a time, and each split's ids are written straight into
    one int32 array (4 bytes a character, the only full-size allocation).
    """
    split = check_split(split)
    if preprocess_rule not in PREPROCESS_RULES:
        preprocess(" ", preprocess_rule)  # raises the UsageError naming the rules
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max_tokens={max_tokens} must be positive (or 0 for all)")
    if not documents:
        raise UsageError("no documents given; pass a corpus spec such as --corpus=time_machine")
    for doc in documents:
        if getattr(doc, "split_at", None) is not None:
            check_standard_split(doc.name, doc.split_at, len(doc.text), preprocess_rule, split,
                                 max_tokens)

    texts, remaining = [], max_tokens
    for doc in documents:
        text = preprocess(doc.text, preprocess_rule)  # `raw` returns the text itself: no copy
        if not text.strip():
            raise UsageError(
                f"corpus {doc.name!r} holds only whitespace; give a document with text"
                if preprocess_rule == "raw" else
                f"corpus {doc.name!r} is empty after --preprocess={preprocess_rule}, which "
                "keeps only the letters A-Z; --preprocess=raw keeps every character")
        if remaining is not None:
            text, remaining = text[:remaining], remaining - min(remaining, len(text))
        texts.append(text)

    spans = {name: [] for name in SPLIT_NAMES}  # (text, start, stop) of each part
    records = []
    for doc, text in zip(documents, texts, strict=True):
        a, b = _document_bounds(doc, len(text), split)
        cuts = dict(zip(SPLIT_NAMES, ((0, a), (a, b), (b, len(text))), strict=True))
        for name, (start, stop) in cuts.items():
            spans[name].append((text, start, stop))
        records.append({"name": doc.name, "author": doc.author, "title": doc.title,
                        "sha256": doc.sha256, "text_sha256": doc.text_sha256,
                        "characters": len(text),
                        "characters_per_split": {k: stop - start
                                                 for k, (start, stop) in cuts.items()}})

    if vocab is None:
        if not any(stop > start for _, start, stop in spans["train"]):
            raise UsageError("no training text to build a vocabulary from; give a train fraction"
                             " > 0 or reuse a saved vocabulary")
        vocab = Vocab.build(piece for text, start, stop in spans["train"]
                            for piece in _pieces(text, start, stop))
    encoded = {}
    for name, parts in spans.items():
        ids = np.empty(sum(stop - start for _, start, stop in parts), dtype=np.int32)
        at = 0
        for text, start, stop in parts:
            vocab.encode_into(text, start, stop, ids[at: at + stop - start])
            at += stop - start
        encoded[name] = ids
    unk_rate = {name: float(np.mean(encoded[name] == UNK_ID))
                for name in HELD_OUT_SPLITS if len(encoded[name])}
    return Splits(vocab=vocab, train=encoded["train"], validation=encoded["validation"],
                  test=encoded["test"], documents=records, unk_rate=unk_rate)
