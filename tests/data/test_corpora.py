"""Corpus sources: mirror, verified downloads, the TFDS layer, Gutenberg clean-up, bad input.

No test touches the network: downloads come from an injected fetcher or a local HTTP server.
"""

import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import urllib.error

import pytest

from deeprnn.data import sources as corpora
from deeprnn.data import tfds_text
from deeprnn.errors import UsageError
from tests.helpers import SHARED_CORPORA

BOOK = (
    "\ufeffThe Project Gutenberg eBook of A Small Book\r\n\r\nTitle: A Small Book\r\n\r\n"
    "Author: Ann Writer\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK A SMALL BOOK ***\r\n"
    "\r\nChapter 1\r\nIt was a dark night.\r\n\r\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK A SMALL BOOK ***\r\nLicence text.\r\n"
).encode()
BODY = "Chapter 1\nIt was a dark night."
PINNED = b"pinned source text\n"


class Fetcher:
    """Serves fixed bytes and counts calls; fails the test's way when given an exception."""

    def __init__(self, result):
        self.result, self.urls = result, []

    def __call__(self, url):
        self.urls.append(url)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def pinned_source(monkeypatch):
    source = corpora.Source("pinned", "https://example.org/pinned.txt", "P. Author", "Pinned",
                            sha256=hashlib.sha256(PINNED).hexdigest(),
                            sha1=hashlib.sha1(PINNED).hexdigest())
    monkeypatch.setitem(corpora.NAMED_SOURCES, "pinned", source)
    return source


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_gutenberg_stripping_bom_newlines_and_header_fields():
    doc = corpora.document_from_bytes("gutenberg:7", BOOK, "", "", "book.txt")
    assert doc.text == BODY
    assert (doc.author, doc.title) == ("Ann Writer", "A Small Book")
    assert doc.sha256 == hashlib.sha256(BOOK).hexdigest()
    named = corpora.document_from_bytes("x", BOOK, "Given", "Title", "book.txt")
    assert (named.author, named.title) == ("Given", "Title")
    plain = corpora.document_from_bytes("p", "\ufeffNo markers.\n".encode(), "", "", "p")
    assert (plain.text, plain.author, plain.title) == ("No markers.\n", "unknown", "p")


def test_download_is_prepared_as_tfds_array_record_and_never_repeated(tmp_path):
    fetch = Fetcher(BOOK)
    (doc,) = corpora.load_documents("gutenberg:7", tfds_data_dir=str(tmp_path), fetch=fetch)
    assert fetch.urls == ["https://www.gutenberg.org/cache/epub/7/pg7.txt"]
    assert (doc.name, doc.text, doc.author) == ("gutenberg:7", BODY, "Ann Writer")
    stored = files_under(tmp_path)
    assert "downloads/deeprnn/gutenberg_7.txt" in stored
    assert any(p.startswith("deeprnn_text/gutenberg_7/1.0.0/") and ".array_record" in p
               for p in stored)
    offline = Fetcher(urllib.error.URLError("no network"))
    assert corpora.load_documents("gutenberg:7", tfds_data_dir=str(tmp_path),
                                  fetch=offline) == [doc]
    # Without the prepared dataset the cached download is used, again without the network.
    for path in sorted((tmp_path / "deeprnn_text").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert corpora.load_documents("gutenberg:7", tfds_data_dir=str(tmp_path),
                                  fetch=offline) == [doc]
    assert offline.urls == []


def test_tfds_dataset_round_trip(tmp_path):
    example = {"name": "written", "text": "two\nlines é", "author": "me", "title": "T",
               "sha256": "ab"}
    assert tfds_text.read_prepared("written", str(tmp_path)) is None
    assert tfds_text.prepare("written", str(tmp_path), example) == example
    assert tfds_text.read_prepared("written", str(tmp_path)) == example


def test_pinned_download_verified_and_cached(tmp_path, pinned_source):
    (doc,) = corpora.load_documents("pinned", tfds_data_dir=str(tmp_path), fetch=Fetcher(PINNED))
    assert doc.text == PINNED.decode() and doc.sha256 == pinned_source.sha256
    assert (tmp_path / "downloads/deeprnn/pinned.txt").read_bytes() == PINNED


@pytest.mark.parametrize("payload,match", [(b"tampered text\n", "checksum mismatch.*sha256"),
                                           (b"\xff\xfe bad bytes", "checksum mismatch")])
def test_corrupted_download_leaves_nothing_in_the_cache(tmp_path, pinned_source, payload, match):
    with pytest.raises(UsageError, match=match):
        corpora.load_documents("pinned", tfds_data_dir=str(tmp_path), fetch=Fetcher(payload))
    assert [p for p in files_under(tmp_path) if not p.startswith("deeprnn_text/")] == []
    assert not any((tmp_path / "deeprnn_text").rglob("*.array_record*"))


def test_unpinned_download_that_is_not_utf8_is_not_cached(tmp_path):
    with pytest.raises(UsageError, match="not UTF-8"):
        corpora.load_documents("gutenberg:9", tfds_data_dir=str(tmp_path),
                               fetch=Fetcher(b"caf\xe9 latin-1"))
    assert not (tmp_path / "downloads/deeprnn/gutenberg_9.txt").exists()


def test_mirror_comes_first_and_is_never_written(tmp_path, monkeypatch):
    mirror, cache = tmp_path / "mirror", tmp_path / "tfds"
    mirror.mkdir()
    (mirror / "gutenberg_7.txt").write_bytes(BOOK)
    fetch = Fetcher(b"the network copy")
    (doc,) = corpora.load_documents("gutenberg:7", str(mirror), str(cache), fetch)
    assert doc.text == BODY and fetch.urls == [] and not cache.exists()
    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(mirror))  # the environment variable works too
    assert corpora.load_documents("gutenberg:7", tfds_data_dir=str(cache), fetch=fetch) == [doc]
    assert files_under(mirror) == ["gutenberg_7.txt"]


def test_mirror_with_a_corrupted_pinned_file(tmp_path, pinned_source):
    (tmp_path / "pinned.txt").write_bytes(b"not the pinned text\n")
    with pytest.raises(UsageError, match="checksum mismatch.*replace it"):
        corpora.load_documents("pinned", data_dir=str(tmp_path), fetch=Fetcher(PINNED))


def test_no_network_and_no_mirror_says_which_file_to_put_where(tmp_path):
    offline = Fetcher(urllib.error.URLError("no route to host"))
    with pytest.raises(UsageError, match=r"put frankenstein\.txt into a folder given by --data_d"):
        corpora.load_documents("frankenstein", tfds_data_dir=str(tmp_path), fetch=offline)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with pytest.raises(UsageError, match=rf"put {mirror}/frankenstein\.txt"):
        corpora.load_documents("frankenstein", str(mirror), str(tmp_path), offline)


def test_a_gs_mirror_is_read_without_network(fake_gcs):
    fake_gcs.pipe("gs://bucket/corpora/gutenberg_7.txt", BOOK)
    never = Fetcher(AssertionError("a mirrored text is never downloaded"))
    (doc,) = corpora.load_documents("gutenberg:7", "gs://bucket/corpora", fetch=never)
    assert doc.text == BODY and never.urls == []
    with pytest.raises(UsageError, match="mirror folder gs://bucket/none does not exist"):
        corpora.load_documents("gutenberg:7", "gs://bucket/none", fetch=never)


def test_a_remote_tfds_data_dir_is_refused_naming_a_gs_mirror_instead():
    with pytest.raises(UsageError, match="--tfds_data_dir=gs://b/tfds must be a local folder;.*"
                                         "pass it as --data_dir"):
        corpora.load_documents("gutenberg:7", tfds_data_dir="gs://b/tfds",
                               fetch=Fetcher(AssertionError("no download expected")))


def test_default_fetcher_over_local_http(tmp_path):
    (tmp_path / "book.txt").write_bytes(BOOK)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/book.txt"
        assert corpora.fetch_url(url) == BOOK
    finally:
        server.shutdown()
        server.server_close()


def test_file_specs_and_several_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n")
    (tmp_path / "b.txt").write_bytes(BOOK)
    docs = corpora.load_documents(f"file:{tmp_path}/a.txt, file:{tmp_path}/b.txt")
    assert [d.text for d in docs] == ["first text\n", BODY]
    assert [d.title for d in docs] == ["a", "A Small Book"]


@pytest.mark.parametrize("spec,match", [
    ("nosuchbook", "unknown corpus 'nosuchbook'; known: time_machine, tiny_shakespeare"),
    ("gutenberg:abc", "gutenberg:<number>"),
    ("time_machine,,frankenstein", "empty entry"),
    ("time_machine,time_machine", "twice"),
    ("file:/no/such/file.txt", "cannot read /no/such/file.txt"),
])
def test_bad_specs(spec, match):
    with pytest.raises(UsageError, match=match):
        corpora.load_documents(spec, fetch=Fetcher(AssertionError("no download expected")))


def test_bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="holds no text"):
        corpora.load_documents(f"file:{tmp_path}/empty.txt")
    with pytest.raises(UsageError, match="not UTF-8 text.*0xe9 at offset 3"):
        corpora.load_documents(f"file:{tmp_path}/latin1.txt")
    with pytest.raises(UsageError, match="cannot read"):
        corpora.load_documents(f"file:{tmp_path}")  # a folder
    with pytest.raises(UsageError, match="does not exist"):
        corpora.load_documents("time_machine", data_dir=str(tmp_path / "absent"))


def test_a_path_cut_at_its_comma_says_that_commas_separate_documents(tmp_path):
    """`file:/tmp/a,b.txt` read as file:/tmp/a and b.txt used to say only `cannot read
    /tmp/a`; when /tmp/a exists, `unknown corpus 'b.txt'`."""
    (tmp_path / "a,b.txt").write_text("the time traveller\n")
    spec = f"file:{tmp_path}/a,b.txt"
    message = (rf"commas separate documents, so it reads 'file:{tmp_path}/a' and 'b.txt', not "
               rf"the file '{tmp_path}/a,b.txt'; a path with a comma cannot be given: copy or "
               "link the file to a name without one")
    with pytest.raises(UsageError, match=message):
        corpora.load_documents(spec)
    (tmp_path / "a").write_text("another text\n")
    with pytest.raises(UsageError, match=message):
        corpora.load_documents(spec)
    with pytest.raises(UsageError, match=r"cannot read .*/x: No such file"):  # no such join
        corpora.load_documents(f"file:{tmp_path}/x,time_machine")


NAMES = ["time_machine", "war_of_the_worlds", "frankenstein", "pride_and_prejudice",
         "war_and_peace", "tiny_shakespeare"]


@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="no shared corpus mirror")
def test_every_mirrored_text_loads_by_name():
    assert sorted(p.stem for p in SHARED_CORPORA.glob("*.txt")) == sorted(NAMES)
    never = Fetcher(AssertionError("the mirror needs no network"))
    docs = corpora.load_documents(",".join(NAMES), str(SHARED_CORPORA), fetch=never)
    for doc in docs:
        assert "*** START OF" not in doc.text and "*** END OF" not in doc.text
        assert not doc.text.startswith("\ufeff") and "\r" not in doc.text
        assert doc.author and doc.title and len(doc.text) > 100_000
        raw = (SHARED_CORPORA / f"{doc.name}.txt").read_bytes()
        assert doc.sha256 == hashlib.sha256(raw).hexdigest()
    assert docs[0].author == docs[1].author == "H. G. Wells"


@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="no shared corpus mirror")
def test_corpora_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "deeprnn.corpora", "--corpus=time_machine",
         f"--data_dir={SHARED_CORPORA}", "--preprocess=d2l", "--max_tokens=0"],  # 0: all
        capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(result.stdout)
    assert summary["characters"] == 173_428 and summary["vocab_size"] == 28
    assert summary["sha256"]["time_machine"] == corpora.NAMED_SOURCES["time_machine"].sha256
    assert summary["authors"] == ["H. G. Wells"] and summary["titles"] == ["The Time Machine"]
    assert sum(summary["characters_per_split"].values()) == 173_428


def test_the_time_machine_ships_with_the_package_and_needs_no_network(tmp_path, monkeypatch):
    """No mirror, no TFDS dataset, no network: the book's text still loads, verified."""
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)

    def no_network(url):
        raise AssertionError(f"tried to download {url}")

    (document,) = corpora.load_documents("time_machine", tfds_data_dir=str(tmp_path),
                                         fetch=no_network)
    assert document.sha256 == corpora.NAMED_SOURCES["time_machine"].sha256
    assert document.text.startswith("The Time Machine, by H. G. Wells")
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or prepared
    # A packaged copy that does not match its pin is refused, naming the file and the fix.
    damaged = corpora.Source("time_machine", "http://x", "a", "t", sha256="0" * 64,
                             packaged="time_machine.txt")
    with pytest.raises(UsageError, match=r"packaged copy deeprnn/data/texts/time_machine.txt: "
                                         r"sha256 .*reinstall deeprnn"):
        corpora.packaged_document(damaged)
