"""The corpus of a multi-host run: every process loads its own copy, and all agree on it.

No process depends on another host's disk. Each one reads the mirror (`--data_dir`, local or
gs://), its own TFDS folder, or downloads its own copy (a text is a few MB): on a pod slice,
where `~/tensorflow_datasets` is each worker's own, waiting for process 0's dataset would wait
forever. Process 0 goes first, so that a TFDS folder the hosts do share (NFS) is prepared once
and read by the rest. Then every process compares the digests of its documents with every
other's: hosts that read different text (a Gutenberg file re-issued between two downloads,
mirrors that differ) would train one model on different token ids per host, so the run stops,
on every process, with one line naming the document and the fix.

A process that fails to load stops every process the same way, with its own error on it and a
pointer to its log on the others, instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from deeprnn.data.sources import Document
from deeprnn.errors import UsageError

_DIGEST = 32  # bytes of a sha256


def _row(documents: list[Document] | None, count: int) -> np.ndarray:
    """[ok, digest of each document's name and text ...] as int32, the same length whether
    loading worked or not (a collective needs one shape on every process)."""
    row = np.zeros(1 + count * _DIGEST, np.int32)
    if documents is not None:
        row[0] = 1
        for i, doc in enumerate(documents):
            digest = hashlib.sha256(f"{doc.name}\0{doc.text_sha256}".encode()).digest()
            row[1 + i * _DIGEST: 1 + (i + 1) * _DIGEST] = np.frombuffer(digest, np.uint8)
    return row


def _attempt(load: Callable[[], list[Document]]):
    try:
        return load(), None
    except Exception as err:  # raised again below, after every process learnt of it
        return None, err


def load_on_every_host(names: list[str], load: Callable[[], list[Document]], *,
                       process_index: int | None = None, process_count: int | None = None,
                       broadcast=multihost_utils.broadcast_one_to_all,
                       allgather=multihost_utils.process_allgather) -> list[Document]:
    """`load()` on every process (process 0 first), checked to give the same documents.

    names: the corpus spec's entries, for the messages (and the digests' count). The process
    numbers and collectives are injectable for tests; by default JAX's.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count == 1:
        return load()
    documents, error = _attempt(load) if index == 0 else (None, None)
    # Also the barrier that lets process 0 fill a shared TFDS folder before the others look.
    if not int(broadcast(np.int32(error is None))):
        raise error or UsageError("process 0 could not load --corpus; see its log")
    if index != 0:
        documents, error = _attempt(load)
    rows = np.asarray(allgather(_row(documents, len(names))))  # (processes, 1 + 32 * docs)
    if error is not None:
        raise error
    failed = [p for p in range(count) if not rows[p, 0]]
    if failed:
        raise UsageError(f"process {failed[0]} could not load --corpus; see its log")
    for i, name in enumerate(names):
        digests = rows[:, 1 + i * _DIGEST: 1 + (i + 1) * _DIGEST]
        differ = [p for p in range(count) if not np.array_equal(digests[p], digests[0])]
        if differ:
            raise UsageError(
                f"processes 0 and {differ[0]} read different text for {name}; give every host "
                "the same copy: --data_dir=gs://BUCKET/corpora holding <name>.txt files")
    return documents
