"""text8 and enwik8: mirror (zipped or not), download cache, checks, the standard split.

Tests write small zips of the same structure (one member; text8's alphabet; every byte value
in enwik8's) and shrink the archives' length and split to fit; the real files and the network
are never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.error
import zipfile

import numpy as np
import pytest

from deeprnn.data import benchmarks
from deeprnn.data import sources as corpora
from deeprnn.data.vocab import build_splits
from deeprnn.errors import UsageError
from tests.data.test_corpora import Fetcher, files_under

LENGTH, SPLIT_AT = 3000, (2700, 2850)  # the standard 90% / 5% / 5%, scaled down


def text8_member(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 9)))
             for _ in range(800)]
    return (" " + " ".join(words)).encode("ascii")[:LENGTH]  # text8 starts with a space


def enwik8_member(seed: int = 0) -> bytes:
    """XML-ish text with every byte value: UTF-8, control bytes, and a "\\r\\n" to keep."""
    head = ("<page>\r\n  <title>Caf\u00e9 \u20ac</title>\n".encode() + bytes(range(256)))
    rng = np.random.default_rng(seed)
    body = rng.choice(list(b"<>/ abcdefgh\n"), LENGTH - len(head)).astype(np.uint8).tobytes()
    return head + body


def zip_of(member: str, data: bytes, *more: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in ((member, data), *more):
            archive.writestr(name, content)
    return buffer.getvalue()


MEMBERS = {"text8": text8_member(), "enwik8": enwik8_member()}
ZIPS = {name: zip_of(name, data) for name, data in MEMBERS.items()}


@pytest.fixture
def small_benchmarks(monkeypatch):
    """text8 and enwik8 with LENGTH-byte members; enwik8 pinned to its synthetic zip."""
    for name, data in ZIPS.items():
        source = corpora.NAMED_SOURCES[name]
        small = dataclasses.replace(source.archive, length=LENGTH, split_at=SPLIT_AT)
        pin = hashlib.sha256(data).hexdigest() if source.sha256 else None
        monkeypatch.setitem(corpora.NAMED_SOURCES, name,
                            dataclasses.replace(source, archive=small, sha256=pin))


def mirror_with(tmp_path, **files: bytes):
    mirror = tmp_path / "mirror"
    mirror.mkdir(parents=True)
    for name, data in files.items():
        (mirror / name.replace("_zip", ".zip")).write_bytes(data)
    return mirror


def test_the_real_benchmarks_are_named_with_their_urls_pins_and_split():
    text8, enwik8 = corpora.NAMED_SOURCES["text8"], corpora.NAMED_SOURCES["enwik8"]
    assert text8.url == "http://mattmahoney.net/dc/text8.zip" and text8.sha256 is None
    assert enwik8.url == "http://mattmahoney.net/dc/enwik8.zip"
    assert enwik8.sha256 == "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
    for source in (text8, enwik8):
        assert source.archive.member == source.name
        assert source.archive.length == 100_000_000
        assert source.archive.split_at == (90_000_000, 95_000_000)
    assert set(text8.archive.alphabet) == set(b"abcdefghijklmnopqrstuvwxyz ")
    assert enwik8.archive.alphabet is None


def test_text8_from_a_mirror_zip_splits_at_the_standard_cut(tmp_path, small_benchmarks):
    mirror = mirror_with(tmp_path, text8_zip=ZIPS["text8"])
    (doc,) = corpora.load_documents("text8", str(mirror), fetch=Fetcher(AssertionError("net")))
    member = MEMBERS["text8"]
    assert doc.text == member.decode("ascii") and doc.split_at == SPLIT_AT
    assert doc.sha256 == hashlib.sha256(member).hexdigest()  # of the member, not of the zip
    splits = build_splits([doc], "raw")
    assert splits.vocab.size == 28  # a-z, space and <unk>
    decode = splits.vocab.decode
    assert decode(splits.train) == member[:2700].decode()
    assert decode(splits.validation) == member[2700:2850].decode()
    assert decode(splits.test) == member[2850:].decode()
    assert splits.documents[0]["characters_per_split"] == {"train": 2700, "validation": 150,
                                                           "test": 150}


def test_enwik8_is_read_as_bytes(tmp_path, small_benchmarks):
    mirror = mirror_with(tmp_path, enwik8_zip=ZIPS["enwik8"])
    (doc,) = corpora.load_documents("enwik8", str(mirror), fetch=Fetcher(AssertionError("net")))
    member = MEMBERS["enwik8"]
    assert len(doc.text) == len(member) == LENGTH  # one character a byte, "\r\n" kept
    splits = build_splits([doc], "raw")
    assert splits.vocab.size == 1 + len(set(member[:2700]))
    assert splits.vocab.size == 257  # every byte value occurs in training here
    for name, part in (("train", member[:2700]), ("validation", member[2700:2850]),
                       ("test", member[2850:])):
        assert splits.vocab.decode(getattr(splits, name)).encode("latin-1") == part
    assert splits.unk_rate == {"validation": 0.0, "test": 0.0}


def test_the_unzipped_mirror_file_gives_the_same_document(tmp_path, small_benchmarks):
    zips = mirror_with(tmp_path / "a", **{f"{name}_zip": data for name, data in ZIPS.items()})
    zipped = corpora.load_documents("text8,enwik8", str(zips))
    unzipped = corpora.load_documents("text8,enwik8", str(mirror_with(tmp_path / "b", **MEMBERS)))
    assert zipped == unzipped


def test_download_is_cached_as_the_verified_zip_without_tfds(tmp_path, small_benchmarks):
    fetch = Fetcher(ZIPS["enwik8"])
    (doc,) = corpora.load_documents("enwik8", tfds_data_dir=str(tmp_path), fetch=fetch)
    assert fetch.urls == ["http://mattmahoney.net/dc/enwik8.zip"]
    assert files_under(tmp_path) == ["downloads/deeprnn/enwik8.zip"]  # no TFDS dataset
    offline = Fetcher(urllib.error.URLError("no network"))
    assert corpora.load_documents("enwik8", tfds_data_dir=str(tmp_path), fetch=offline) == [doc]
    assert offline.urls == []


def test_no_network_says_which_zip_to_put_where(tmp_path, small_benchmarks):
    offline = Fetcher(urllib.error.URLError("no route to host"))
    mirror = mirror_with(tmp_path)
    with pytest.raises(UsageError, match=rf"put {mirror}/text8\.zip \(or the unzipped text8\)"):
        corpora.load_documents("text8", str(mirror), str(tmp_path), offline)


def other_member(text: bytes) -> bytes:
    return zip_of("text8", MEMBERS["text8"], ("readme.txt", text))


@pytest.mark.parametrize("name,payload,match", [
    ("enwik8", zip_of("enwik8", MEMBERS["enwik8"][:-1] + b"x"), "checksum mismatch.*sha256"),
    ("text8", zip_of("text8", MEMBERS["text8"][:-1] + b"\n"),
     f"text8 holds byte 0x0a at offset {LENGTH - 1:,}, outside its alphabet"),
    ("text8", zip_of("text8", b" A" + MEMBERS["text8"][2:]), "byte 0x41 at offset 1,"),
    ("text8", zip_of("text8", MEMBERS["text8"][:-5]), f"has {LENGTH - 5:,} bytes, not 3,000"),
    ("text8", zip_of("data", MEMBERS["text8"]), r"holds \['data'\], not the one file 'text8'"),
    ("text8", other_member(b"hi"), r"not the one file"),
    ("text8", b"PK\x03\x04 not really a zip", "not a readable zip"),
], ids=["checksum", "newline", "capital", "short", "other_name", "two_files", "not_a_zip"])
def test_a_bad_download_is_refused_and_not_cached(tmp_path, small_benchmarks, name, payload,
                                                  match):
    with pytest.raises(UsageError, match=match + ".*the download is corrupt; nothing was cached"):
        corpora.load_documents(name, tfds_data_dir=str(tmp_path), fetch=Fetcher(payload))
    assert files_under(tmp_path) == []


def test_bad_mirror_files_name_the_file_and_the_fix(tmp_path, small_benchmarks):
    mirror = mirror_with(tmp_path, text8=MEMBERS["text8"][:-1])
    with pytest.raises(UsageError, match=rf"{mirror}/text8: text8 has 2,999 bytes, not 3,000; "
                                         "replace it with text8 from http://mattmahoney"):
        corpora.load_documents("text8", str(mirror))
    (mirror / "enwik8.zip").write_bytes(ZIPS["text8"])
    with pytest.raises(UsageError, match=r"checksum mismatch for enwik8 in .*enwik8\.zip.*"
                                         "replace it with http://mattmahoney.net/dc/enwik8.zip"):
        corpora.load_documents("enwik8", str(mirror))


def test_the_standard_split_refuses_flags_that_would_change_it(tmp_path, small_benchmarks):
    mirror = mirror_with(tmp_path, text8_zip=ZIPS["text8"])
    docs = corpora.load_documents("text8", str(mirror))
    with pytest.raises(UsageError, match="text8 is read as its own symbols.*--preprocess=raw"):
        build_splits(docs, "d2l")
    with pytest.raises(UsageError, match=r"--split=0.8,0.1,0.1 does not apply to text8, which "
                                         r"has the standard split \(first 2,700 / next 150 / "
                                         r"last 150 characters\); leave --split at"):
        build_splits(docs, "raw", split=(0.8, 0.1, 0.1))
    with pytest.raises(UsageError, match="--max_tokens=1000 does not apply to text8"):
        build_splits(docs, "raw", max_tokens=1000)
    whole = build_splits(docs, "raw", split=(1, 0, 0))  # what `evaluate --split=all` asks
    assert len(whole.train) == LENGTH and len(whole.validation) == len(whole.test) == 0


def test_a_benchmark_mixes_with_other_documents(tmp_path, small_benchmarks):
    mirror = mirror_with(tmp_path, text8_zip=ZIPS["text8"])
    (tmp_path / "book.txt").write_text("a short book of plain words\n" * 20)
    docs = corpora.load_documents(f"text8,file:{tmp_path}/book.txt", str(mirror))
    splits = build_splits(docs, "raw", split=(0.9, 0.05, 0.05))
    per_split = [d["characters_per_split"] for d in splits.documents]
    assert per_split[0] == {"train": 2700, "validation": 150, "test": 150}  # its own cut
    assert per_split[1] == {"train": 504, "validation": 28, "test": 28}  # the fractions
    assert len(splits.train) == 2700 + 504


def test_archive_checks_directly():
    archive = benchmarks.Archive("text8", length=4, alphabet=b"ab ")
    benchmarks.check_member(b"ab a", archive, "x", "fix")
    with pytest.raises(UsageError, match="byte 0x63 at offset 2"):
        benchmarks.check_member(b"abca", archive, "x", "fix")
    text, digest = benchmarks.member_text(bytes([0, 200, 255, 10]))
    assert [ord(c) for c in text] == [0, 200, 255, 10]
    assert digest == hashlib.sha256(bytes([0, 200, 255, 10])).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["text8", "enwik8"])
def test_the_benchmark_flagfiles_train_and_score_bits_per_character(
        name, tmp_path, small_benchmarks, monkeypatch, quick_compile):
    """The experiments' flagfiles on the small archives, shrunk to two steps: the standard
    split reaches validation and test, scored in bits per character."""
    from tests.helpers import REPO, run

    monkeypatch.chdir(REPO)  # text8_lstm.flags names enwik8_lstm.flags from the repository root
    mirror = mirror_with(tmp_path, **{f"{name}_zip": ZIPS[name]})
    summary = run([f"--flagfile=experiments/{name}_lstm.flags", f"--data_dir={mirror}",
                   "--num_hiddens=8", "--num_train_steps=2", "--batch_size=4", "--num_steps=8",
                   "--eval_batch_size=2", "--sample_length=5", f"--workdir={tmp_path / 'run'}"])
    final = summary["final"]
    assert final["validation/tokens"] == final["test/tokens"] == 150 - 2
    assert 0 < final["test/bits_per_char"] < 9  # under 8 bits a byte, give or take the <unk>
    assert [d["characters_per_split"] for d in summary["corpus"]["documents"]] == [
        {"train": 2700, "validation": 150, "test": 150}]
