"""Named corpora: where each text comes from, how it is verified, cached and cleaned.

A spec lists documents, comma-separated: a name below, `gutenberg:<id>`, or `file:<path>`.
Each one is read, in order of preference, from
  1. the mirror: `<data_dir>/<name>.txt` (`--data_dir` or $DEEPRNN_DATA_DIR, a local folder or
     a gs:// one), only ever read;
  2. the copy shipped in the package (The Time Machine only: deeprnn/data/texts/);
  3. the TFDS dataset `deeprnn_text/<name>` prepared earlier under `--tfds_data_dir` (local);
  4. a download from the canonical source, checksum-verified where pinned, cached under
     `<tfds_data_dir>/downloads/deeprnn/` (never repeated) and prepared as that dataset.
Every process of a multi-host run loads its own copy this way (the texts are a few MB), so none
depends on another host's disk; deeprnn.training.hosts checks that they all got the same text.

The benchmarks text8 and enwik8 (deeprnn/data/benchmarks.py) come as zips of 10^8 bytes and
take another path: `<data_dir>/<name>.zip`, else the unzipped `<data_dir>/<name>` (Mahoney's
file names), else the verified zip in the download cache, else a download (cached as that zip).
They skip TFDS: the cached zip is the pinned file itself, so every load checks it again,
where a TFDS dataset would hold a re-encoded copy (enwik8's bytes as UTF-8 text) that no pin
covers; and TFDS would add its import and whole copies of the 100 MB record to every load (on
a synthetic 10^8-character text8, with 2 shared cores: preparing took 1.6 s and 256 MB above
the text; reading it back 0.45 s and 407 MB above the imports, against 0.5-0.9 s and ~315 MB
at the peak for the zip).
`python -m deeprnn.corpora` prints what a spec loads to.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from etils import epath

from deeprnn.config import check_reachable
from deeprnn.data import benchmarks
from deeprnn.errors import UsageError

DATA_DIR_ENV = "DEEPRNN_DATA_DIR"
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"


@dataclass(frozen=True)
class Document:
    name: str
    text: str  # Gutenberg boilerplate stripped, BOM gone, newlines as "\n"
    author: str
    title: str
    sha256: str  # of the source bytes as read or downloaded (a benchmark's: of its member)
    split_at: tuple[int, int] | None = None  # a benchmark's standard cut (train|validation|test)

    @functools.cached_property
    def text_sha256(self) -> str:
        """A digest of the text itself: what a resume and the hosts of a run compare (two
        copies of one text may differ in their bytes: a BOM, line endings, a Gutenberg
        header). Hashed a slice at a time, so a 100M-character text needs no encoded copy."""
        hasher = hashlib.sha256()
        for start in range(0, len(self.text), 1 << 24):
            hasher.update(self.text[start:start + (1 << 24)].encode("utf-8", "surrogatepass"))
        return hasher.hexdigest()


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    author: str
    title: str
    # Checksums are pinned only where the source never changes. d2l's timemachine.txt (sha1 from
    # d2l's DATA_HUB) and char-rnn's input.txt (the repository is archived; sha256 equal to the
    # copy in shared/corpora) are fixed files. Gutenberg re-issues its files (new headers,
    # corrections, and the mirror's copies already differ: some stripped, some with a BOM), so
    # Gutenberg sources are not pinned: their sha256 is recorded, not checked.
    sha256: str | None = None
    sha1: str | None = None
    # A copy shipped inside the package (deeprnn/data/texts/), read when no mirror has the
    # text, so that the book's recipe runs on a fresh machine without network. Only The Time
    # Machine ships (public domain, 179 KB, pinned above): the main command needs it.
    packaged: str | None = None
    archive: benchmarks.Archive | None = None  # text8, enwik8: a zip of one checked member

    @property
    def file_stem(self) -> str:  # mirror file name, cache file name, TFDS config name
        return self.name.replace(":", "_")


def _gutenberg(name: str, book_id: int, author: str = "", title: str = "") -> Source:
    return Source(name, GUTENBERG_URL.format(id=book_id), author, title)


NAMED_SOURCES = {s.name: s for s in (
    Source("time_machine", "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
           "H. G. Wells", "The Time Machine",
           sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
           sha1="090b5e7e70c295757f55df93cb0a180b9691891a", packaged="time_machine.txt"),
    Source("tiny_shakespeare", "https://raw.githubusercontent.com/karpathy/char-rnn/master/"
           "data/tinyshakespeare/input.txt", "William Shakespeare", "Tiny Shakespeare",
           sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    _gutenberg("war_of_the_worlds", 36, "H. G. Wells", "The War of the Worlds"),
    _gutenberg("frankenstein", 84, "Mary Shelley", "Frankenstein"),
    _gutenberg("pride_and_prejudice", 1342, "Jane Austen", "Pride and Prejudice"),
    _gutenberg("war_and_peace", 2600, "Leo Tolstoy", "War and Peace"),
    # Mahoney's zips. enwik8.zip's sha256 and size (36,445,475 bytes) are those that
    # huggingface/datasets pins for this URL (datasets/enwik8/dataset_infos.json). text8.zip's
    # could not be checked against an independent record here, so it is not pinned (as
    # Gutenberg's are not); its member's structure is checked instead, every time: exactly
    # 10^8 characters, only a-z and space (benchmarks.check_member).
    Source("text8", "http://mattmahoney.net/dc/text8.zip", "Wikipedia contributors",
           "text8 (10^8 characters of English Wikipedia, cleaned to a-z and space)",
           archive=benchmarks.TEXT8),
    Source("enwik8", "http://mattmahoney.net/dc/enwik8.zip", "Wikipedia contributors",
           "enwik8 (the first 10^8 bytes of an English Wikipedia XML dump)",
           sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
           archive=benchmarks.ENWIK8),
)}

_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Gutenberg's `*** START OF` and `*** END OF` lines; unchanged without."""
    start = _START.search(text)
    end = _END.search(text, start.end() if start else 0)
    if start is None and end is None:
        return text
    return text[start.end() if start else 0: end.start() if end else len(text)].strip()


def _header_field(text: str, field: str) -> str:
    """`Title:` / `Author:` from a Gutenberg header (before the START line), else ''."""
    start = _START.search(text)
    match = re.search(rf"^{field}:[ \t]*(.+?)\s*$", text[: start.start() if start else 0],
                      re.MULTILINE)
    return match.group(1) if match else ""


def document_from_bytes(name: str, data: bytes, author: str, title: str, where: str,
                        fallback_title: str = "") -> Document:
    """Decodes (BOM-tolerant), normalises newlines as Python's text mode does (d2l reads that
    way; Gutenberg serves "\\r\\n"), strips Gutenberg boilerplate, and rejects empty text.
    An empty author/title is taken from the Gutenberg header when there is one."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset"
                         f" {e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from e
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    author = author or _header_field(text, "Author") or "unknown"
    title = title or _header_field(text, "Title") or fallback_title or name
    text = strip_gutenberg_boilerplate(text)
    if not text.strip():
        raise UsageError(f"{where} holds no text; point the corpus spec at a non-empty file")
    return Document(name, text, author, title, hashlib.sha256(data).hexdigest())


def verify_checksums(source: Source, data: bytes, where: str, fix: str) -> None:
    for algorithm in ("sha256", "sha1"):
        expected = getattr(source, algorithm)
        got = hashlib.new(algorithm, data).hexdigest() if expected else None
        if got != expected:
            raise UsageError(f"checksum mismatch for {source.name} in {where}: {algorithm} {got},"
                             f" expected {expected}; {fix}")


def fetch_url(url: str) -> bytes:
    """The default fetcher (tests inject their own)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _read_file(path: Path | epath.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}; check the path") from e


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def resolve_source(entry: str) -> Source:
    if entry in NAMED_SOURCES:
        return NAMED_SOURCES[entry]
    if entry.startswith("gutenberg:"):
        book_id = entry.removeprefix("gutenberg:")
        if not book_id.isdigit():
            raise UsageError(f"{entry!r}: a Gutenberg book is gutenberg:<number>,"
                             " e.g. gutenberg:84")
        return _gutenberg(f"gutenberg:{int(book_id)}", int(book_id))
    known = ", ".join([*NAMED_SOURCES, "gutenberg:<id>", "file:<path>"])
    raise UsageError(f"unknown corpus {entry!r}; known: {known}")


def parse_spec(spec: str) -> list[str]:
    entries = [e.strip() for e in spec.split(",")]
    if not spec.strip() or not all(entries):
        raise UsageError(f"corpus spec {spec!r} has an empty entry; e.g. time_machine,frankenstein")
    if len(set(entries)) != len(entries):
        # Each document is split on its own: a repeated one would put its test text in training.
        raise UsageError(f"corpus spec {spec!r} names a document twice; list each once")
    return entries


def _refuse_a_path_with_a_comma(spec: str, index: int) -> None:
    """Entry `index` of the spec is a missing file or an unknown name: when it and its
    neighbours, joined by their commas, make a file: path that exists, the spec cut a path at
    its comma (commas separate documents, and a spec has no way to quote one)."""
    pieces = spec.split(",")
    for first in range(index + 1):
        for last in range(max(index, first + 1), len(pieces)):
            joined = ",".join(pieces[first:last + 1]).strip()
            if joined.startswith("file:") and Path(joined.removeprefix("file:")).expanduser(
                    ).is_file():
                parts = " and ".join(repr(p.strip()) for p in pieces[first:last + 1])
                raise UsageError(
                    f"corpus spec {spec!r}: commas separate documents, so it reads {parts}, "
                    f"not the file {joined.removeprefix('file:')!r}; a path with a comma "
                    "cannot be given: copy or link the file to a name without one")


def _default_tfds_data_dir() -> str:
    # TFDS's own default, computed without importing TFDS.
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _fetch(source: Source, fetch: Callable[[str], bytes], mirror: str | None, suffix: str,
           also: str = "") -> bytes:
    """The source's bytes from its URL; without them, one line saying which file to put where."""
    put = (f"{epath.Path(mirror) / source.file_stem}{suffix}" if mirror else
           f"{source.file_stem}{suffix} into a folder given by --data_dir or ${DATA_DIR_ENV}")
    try:
        return fetch(source.url)
    except Exception as e:  # any fetcher failure means the same thing: no copy of the text
        raise UsageError(f"cannot download {source.name} from {source.url} ({e}); without"
                         f" network, put {put}{also}") from e


def _download(source: Source, cache: Path, fetch: Callable[[str], bytes],
              mirror: str | None) -> Document:
    """The verified source, from the download cache or fetched and then cached."""
    path = cache / f"{source.file_stem}.txt"
    if path.exists():
        data = _read_file(path)
        verify_checksums(source, data, str(path), f"delete {path} to download it again")
        return document_from_bytes(source.name, data, source.author, source.title, str(path))
    data = _fetch(source, fetch, mirror, ".txt")
    verify_checksums(source, data, source.url, "the download is corrupt; nothing was cached")
    document = document_from_bytes(source.name, data, source.author, source.title, source.url)
    _write_atomically(path, data)  # only after every check passed
    return document


def _archive_document(source: Source, zip_data: bytes, where: str, fix: str) -> Document:
    verify_checksums(source, zip_data, where, fix)  # the zip's, where pinned
    return _member_document(source, benchmarks.member_of_zip(zip_data, source.archive, where,
                                                             fix))


def _member_document(source: Source, member: bytes) -> Document:
    text, digest = benchmarks.member_text(member)
    return Document(source.name, text, source.author, source.title, digest,
                    split_at=source.archive.split_at)


def _load_archive(source: Source, mirror: str | None, tfds_data_dir: str | None,
                  fetch: Callable[[str], bytes]) -> Document:
    """A benchmark (text8, enwik8) from its first copy found (see the module docstring)."""
    member = source.archive.member
    if mirror:
        # epath: a gs:// mirror (the workers of a pod slice) reads as a local one does.
        zipped = epath.Path(mirror) / f"{source.file_stem}.zip"
        unzipped = epath.Path(mirror) / member
        if zipped.is_file():
            return _archive_document(source, _read_file(zipped), str(zipped),
                                     f"replace it with {source.url}")
        if unzipped.is_file():
            data = _read_file(unzipped)
            benchmarks.check_member(data, source.archive, str(unzipped),
                                    f"replace it with {member} from {source.url}")
            return _member_document(source, data)
    cache = Path(tfds_data_dir or _default_tfds_data_dir()) / "downloads" / "deeprnn"
    cached = cache / f"{source.file_stem}.zip"
    if cached.is_file():
        return _archive_document(source, _read_file(cached), str(cached),
                                 f"delete {cached} to download it again")
    data = _fetch(source, fetch, mirror, ".zip", f" (or the unzipped {member})")
    document = _archive_document(source, data, source.url,
                                 "the download is corrupt; nothing was cached")
    _write_atomically(cached, data)  # only after every check passed
    return document


def _load_through_tfds(source: Source, mirror: str | None, tfds_data_dir: str | None,
                       fetch: Callable[[str], bytes]) -> Document:
    try:  # deferred: TFDS is slow to import and absent on the GPU machines; a mirror needs none
        from deeprnn.data import tfds_text
    except ImportError as e:
        raise UsageError(f"{source.name} is not in a mirror and tensorflow-datasets is missing"
                         f" ({e}); pip install tensorflow-datasets array_record, or put"
                         f" {source.file_stem}.txt into a folder given by --data_dir") from e
    root = tfds_data_dir or _default_tfds_data_dir()
    config = source.file_stem
    example = tfds_text.read_prepared(config, root)
    if example is None:
        document = _download(source, Path(root) / "downloads" / "deeprnn", fetch, mirror)
        example = tfds_text.prepare(config, root, asdict(document))
    return Document(**example)


def load_documents(spec: str, data_dir: str | None = None, tfds_data_dir: str | None = None,
                   fetch: Callable[[str], bytes] | None = None) -> list[Document]:
    """The documents of a corpus spec, in spec order (see the module docstring for sources)."""
    mirror = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if mirror:
        check_reachable(mirror, "data_dir")
    if mirror and not epath.Path(mirror).is_dir():
        raise UsageError(f"mirror folder {mirror} does not exist; fix --data_dir/${DATA_DIR_ENV}")
    if tfds_data_dir and "://" in tfds_data_dir:
        # The download cache and TFDS's atomic rename of a prepared dataset need a local disk.
        raise UsageError(f"--tfds_data_dir={tfds_data_dir} must be a local folder; to share the "
                         "texts between hosts, put <name>.txt files in a folder such as "
                         "gs://BUCKET/corpora and pass it as --data_dir")
    documents = []
    for index, entry in enumerate(parse_spec(spec)):
        if entry.startswith("file:"):
            if not entry.removeprefix("file:").strip():
                raise UsageError(f"corpus {entry!r} names no file; give its path, e.g. "
                                 "file:books/kafka.txt")
            path = Path(entry.removeprefix("file:")).expanduser()
            if not path.exists():
                _refuse_a_path_with_a_comma(spec, index)
            documents.append(document_from_bytes(entry, _read_file(path), "", "", str(path),
                                                 fallback_title=path.stem))
            continue
        try:
            source = resolve_source(entry)
        except UsageError:
            _refuse_a_path_with_a_comma(spec, index)
            raise
        if source.archive is not None:
            documents.append(_load_archive(source, mirror, tfds_data_dir, fetch or fetch_url))
            continue
        mirrored = epath.Path(mirror) / f"{source.file_stem}.txt" if mirror else None
        if mirrored is not None and mirrored.is_file():
            data = _read_file(mirrored)
            verify_checksums(source, data, str(mirrored), f"replace it with {source.url}")
            documents.append(document_from_bytes(source.name, data, source.author, source.title,
                                                 str(mirrored)))
            continue
        if source.packaged:
            documents.append(packaged_document(source))
            continue
        documents.append(_load_through_tfds(source, mirror, tfds_data_dir, fetch or fetch_url))
    return documents


def packaged_document(source: Source) -> Document:
    """The copy of `source` that ships inside the package, checked against its pins."""
    data = (importlib.resources.files("deeprnn.data") / "texts" / source.packaged).read_bytes()
    where = f"the packaged copy deeprnn/data/texts/{source.packaged}"
    verify_checksums(source, data, where, "reinstall deeprnn, or give a mirror with --data_dir")
    return document_from_bytes(source.name, data, source.author, source.title, where)


def describe(spec: str, splits, documents: list[Document], preprocess_rule: str) -> dict:
    """The JSON summary the corpora CLI prints."""
    per_split = {name: int(len(getattr(splits, name))) for name in ("train", "validation", "test")}
    return {
        "spec": spec,
        "preprocess": preprocess_rule,
        "characters": sum(per_split.values()),
        "characters_per_split": per_split,
        "vocab_size": splits.vocab.size,
        "sha256": {d.name: d.sha256 for d in documents},
        "authors": list(dict.fromkeys(d.author for d in documents)),
        "titles": [d.title for d in documents],
        "unk_rate": splits.unk_rate,
        "documents": splits.documents,
    }
