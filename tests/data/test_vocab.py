"""Preprocessing rules, vocabulary and splits, against results worked out by hand."""

import numpy as np
import pytest

from deeprnn.config import parse_split
from deeprnn.data import sources as corpora
from deeprnn.data.vocab import Vocab, build_splits, preprocess
from deeprnn.errors import UsageError
from tests.helpers import SHARED_CORPORA

TEXT = "Hello, World!\nIt's 42.\n"


def doc(name, text):
    return corpora.Document(name=name, text=text, author="A", title=name.upper(), sha256="0")


def test_preprocess_rules_by_hand():
    # d2l 1.0: every run of non-letters (", ", "!\n", "'", " 42.\n") becomes one space.
    assert preprocess(TEXT, "d2l") == "hello world it s "
    # d2l 0.17: per line, stripped, glued: "hello world" + "it s" + "".
    assert preprocess(TEXT, "d2l_lines") == "hello worldit s"
    assert preprocess("A\r\nb\rc", "d2l_lines") == "abc"  # universal newlines, like open()
    assert preprocess(TEXT, "raw") == TEXT
    with pytest.raises(UsageError, match="d2l, d2l_lines, raw"):
        preprocess(TEXT, "lower")


def test_vocab_order_round_trip_and_json():
    vocab = Vocab.build(["abbccc", "cb"])
    assert vocab.tokens == ["<unk>", "c", "b", "a"]  # by count: c 4, b 3, a 1
    assert Vocab.build(["ba"]).tokens == ["<unk>", "a", "b"]  # ties by character
    ids = vocab.encode("cabz")
    assert ids.dtype == np.int32 and ids.tolist() == [1, 3, 2, 0]  # z is unknown
    assert vocab.decode(vocab.encode("abcabc")) == "abcabc"
    assert vocab.decode([0]) == "<unk>"
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab and again.size == 4
    unicode_vocab = Vocab.build(["é€ \n"])
    assert unicode_vocab.decode(unicode_vocab.encode("€é\n ")) == "€é\n "
    with pytest.raises(UsageError, match="vocabulary"):
        Vocab.from_json('{"tokens": ["a", "b"]}')
    with pytest.raises(UsageError, match="vocabulary"):
        Vocab.from_json("not json")


def test_splits_contiguous_per_document_disjoint_and_complete():
    docs = [doc("one", "abcdabcd"), doc("two", "ABCDEFABCDEF"), doc("three", "xyzw")]
    splits = build_splits(docs, "raw", split=(0.5, 0.25, 0.25))
    decode = splits.vocab.decode
    # one: [0,4) [4,6) [6,8); two: [0,6) [6,9) [9,12); three: [0,2) [2,3) [3,4);
    # parts concatenated in spec order. z and w appear only in held-out text: <unk>.
    assert decode(splits.train) == "abcd" + "ABCDEF" + "xy"
    assert decode(splits.validation) == "ab" + "ABC" + "<unk>"
    assert decode(splits.test) == "cd" + "DEF" + "<unk>"
    assert [d["characters_per_split"] for d in splits.documents] == [
        {"train": 4, "validation": 2, "test": 2}, {"train": 6, "validation": 3, "test": 3},
        {"train": 2, "validation": 1, "test": 1}]
    assert splits.documents[1]["title"] == "TWO" and splits.documents[2]["characters"] == 4
    assert set(splits.vocab.tokens[1:]) == set("abcdABCDEFxy")
    assert splits.unk_rate == {"validation": pytest.approx(1 / 6), "test": pytest.approx(1 / 6)}


def test_d2l_mode_max_tokens_and_no_held_out_split():
    docs = [doc("one", "abcdefghij"), doc("two", "klmnopqrst")]
    splits = build_splits(docs, "raw", split=(1, 0, 0), max_tokens=15)
    assert splits.vocab.decode(splits.train) == "abcdefghij" + "klmno"
    assert len(splits.validation) == len(splits.test) == 0
    assert splits.unk_rate == {}


def test_vocab_reuse_maps_unknown_characters_to_unk():
    vocab = Vocab.build(["ab "])
    splits = build_splits([doc("x", "abcab")], "raw", split=(0, 0, 1), vocab=vocab)
    assert splits.vocab is vocab
    assert splits.test.tolist() == vocab.encode("abcab").tolist()
    assert splits.unk_rate == {"test": pytest.approx(0.2)}


@pytest.mark.parametrize("split", [(0.5, 0.5, 0.5), (0.9, 0.05), (1.2, -0.1, -0.1)])
def test_split_fractions_must_add_up(split):
    with pytest.raises(UsageError, match="split"):
        build_splits([doc("x", "abc")], "raw", split=split)


def test_parse_split_and_other_bad_input():
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    with pytest.raises(UsageError, match="add up"):
        parse_split("0.8,0.1,0.2")
    with pytest.raises(UsageError, match="three"):
        parse_split("a,b,c")
    with pytest.raises(UsageError, match=r"corpus 'digits' is empty after --preprocess=d2l, "
                                         r"which keeps only the letters A-Z; "
                                         r"--preprocess=raw keeps every character"):
        build_splits([doc("digits", "1234 !")], "d2l")
    with pytest.raises(UsageError, match="max_tokens"):
        build_splits([doc("x", "abc")], "raw", max_tokens=0)
    with pytest.raises(UsageError, match="training text"):
        build_splits([doc("x", "abc")], "raw", split=(0, 0, 1))


@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="no shared corpus mirror")
def test_time_machine_counts_match_d2l():
    docs = corpora.load_documents("time_machine", data_dir=str(SHARED_CORPORA))
    d2l = preprocess(docs[0].text, "d2l")
    assert len(d2l) == 173_428 and len(set(d2l)) == 27
    assert len(preprocess(docs[0].text, "d2l_lines")) == 170_580
    splits = build_splits(docs, "d2l", split=(1, 0, 0))
    assert splits.vocab.size == 28 and len(splits.train) == 173_428
    d2l_017 = build_splits(docs, "d2l_lines", split=(1, 0, 0), max_tokens=10_000)
    assert len(d2l_017.train) == 10_000


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_chunked_counting_and_encoding_equal_a_character_loop(monkeypatch, chunk):
    """Counting and encoding go CHUNK_CHARS at a time, by bytes where every character is below
    256 and by code points elsewhere; any chunk size gives what a loop over characters does."""
    from collections import Counter

    from deeprnn.data import vocab as vocab_module

    monkeypatch.setattr(vocab_module, "CHUNK_CHARS", chunk)
    texts = ["the time machine\n\x00\xff\xe9", "caf\xe9 \u20ac\u00e9 na\xefve \U0001f600 x",
             "plain ascii only"]
    counts = Counter("".join(texts))
    vocab = Vocab.build(texts)
    assert vocab.tokens[1:] == sorted(counts, key=lambda c: (-counts[c], c))
    index = {c: i for i, c in enumerate(vocab.tokens)}
    probe = "".join(texts) + "zq\u20ac\u4e2d"  # z, q and \u4e2d are unknown
    assert vocab.encode(probe).tolist() == [index.get(c, 0) for c in probe]
    out = np.full(9, -1, dtype=np.int32)
    vocab.encode_into(probe, 5, 14, out)
    assert out.tolist() == [index.get(c, 0) for c in probe[5:14]]


def test_splits_are_encoded_without_copying_the_text(monkeypatch):
    """build_splits cuts each part by position: the parts' text is never sliced out whole."""
    from deeprnn.data import vocab as vocab_module

    monkeypatch.setattr(vocab_module, "CHUNK_CHARS", 4)
    sliced = []
    pieces = vocab_module._pieces

    def record(text, start=0, stop=None):
        for piece in pieces(text, start, stop):
            sliced.append(len(piece))
            yield piece
    monkeypatch.setattr(vocab_module, "_pieces", record)
    splits = build_splits([doc("one", "abcdefghijklmnopqrst")], "raw", split=(0.5, 0.25, 0.25))
    assert splits.vocab.decode(splits.train) == "abcdefghij"
    assert splits.vocab.decode(splits.test) == "<unk>" * 5  # held-out letters unseen in training
    assert max(sliced) == 4
