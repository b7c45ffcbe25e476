"""The standard character-level benchmarks, text8 and enwik8: what their zips hold and how each
is checked, split and read.

Both are Matt Mahoney's files (http://mattmahoney.net/dc/textdata.html), each a zip of one
member of exactly 10^8 bytes taken from English Wikipedia: enwik8 the raw XML dump (the Hutter
Prize's data), text8 the same kind of text cleaned to 27 symbols (a-z and the space). Both are
scored on the same fixed split: the first 90M characters train, the next 5M validate, the last
5M test (e.g. salesforce/awd-lstm-lm's data/enwik8/prep_enwik8.py cuts enwik8 so).

Reading (deeprnn.data.sources loads them from a mirror, the download cache or the network):
  text8   27 symbols; checked to be exactly 10^8 characters of a-z and space.
  enwik8  bytes: 256 possible symbols, the vocabulary holds those that occur in training. The
          member is decoded as latin-1, which maps byte b to the character U+00b and back one
          to one, so the vocabulary (which maps characters) maps bytes and every id is one byte:
          bits per character are bits per byte, the benchmark's measure. Decoding it as UTF-8
          would merge multi-byte sequences into one symbol (fewer, different predictions, not
          comparable with published numbers), and the cut at 10^8 bytes can split a sequence.
          A generated sample is then bytes shown as latin-1: `sample.encode("latin-1")` gives
          the bytes back (UTF-8 for Wikipedia's non-ASCII text).
Neither goes through the d2l preprocessing (deeprnn.data.vocab.check_standard_split).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass

from deeprnn.errors import UsageError

CHARACTERS = 100_000_000
STANDARD_SPLIT_AT = (90_000_000, 95_000_000)  # train [0, a), validation [a, b), test [b, end)


@dataclass(frozen=True)
class Archive:
    """What a benchmark's zip holds: one `member` of exactly `length` bytes, cut at `split_at`;
    `alphabet` lists the only bytes allowed in it (None: any byte)."""

    member: str
    length: int = CHARACTERS
    split_at: tuple[int, int] = STANDARD_SPLIT_AT
    alphabet: bytes | None = None


TEXT8 = Archive("text8", alphabet=b" abcdefghijklmnopqrstuvwxyz")
ENWIK8 = Archive("enwik8")


def check_member(data: bytes, archive: Archive, where: str, fix: str) -> None:
    """UsageError unless `data` is what the archive's member must be (length, alphabet)."""
    if len(data) != archive.length:
        raise UsageError(f"{where}: {archive.member} has {len(data):,} bytes, not "
                         f"{archive.length:,}; {fix}")
    if archive.alphabet is not None:
        # bytes.translate deletes every allowed byte in one C pass; what is left is wrong.
        wrong = data.translate(None, archive.alphabet)
        if wrong:
            offset = data.find(wrong[:1])
            raise UsageError(f"{where}: {archive.member} holds byte 0x{wrong[0]:02x} at offset "
                             f"{offset:,}, outside its alphabet (a-z and space); {fix}")


def member_of_zip(zip_data: bytes, archive: Archive, where: str, fix: str) -> bytes:
    """The member of a benchmark's zip, after checking that the zip holds exactly that one file
    and that it passes check_member."""
    try:
        with zipfile.ZipFile(io.BytesIO(zip_data)) as archive_file:
            names = archive_file.namelist()
            if names != [archive.member]:
                raise UsageError(f"{where} holds {names}, not the one file {archive.member!r}; "
                                 f"{fix}")
            data = archive_file.read(archive.member)  # checks the member's CRC-32 too
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise UsageError(f"{where} is not a readable zip ({e}); {fix}") from e
    check_member(data, archive, where, fix)
    return data


def member_text(data: bytes) -> tuple[str, str]:
    """(text, sha256) of a checked member: one character a byte (latin-1, see the module
    docstring), and the digest of the bytes themselves, the same whether they came zipped or
    not, so a run trained from a zip resumes from the unzipped file."""
    return data.decode("latin-1"), hashlib.sha256(data).hexdigest()
