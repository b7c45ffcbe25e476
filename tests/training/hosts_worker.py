"""Subprocess side of test_hosts.py: one process of a two-process training run (one JAX system
over 127.0.0.1), in a HOME of its own, whose corpus is downloaded by a fake fetcher.

    python tests/training/hosts_worker.py OUT.json BOOK.txt ADDRESS PROCESS_ID WORKDIR

Writes what this process downloaded, what its own ~/tensorflow_datasets holds, a digest of the
token ids it trained on, and the run's final scores.
"""

import hashlib
import json
import os
import pathlib
import sys

import numpy as np

from deeprnn.config import parse_args
from deeprnn.data import sources
from deeprnn.training import loop, setup

out, book, address, process_id, workdir = sys.argv[1:6]
fetched = []


def fake_fetch(url: str) -> bytes:  # stands in for the network: every host downloads its own
    fetched.append(url)
    return pathlib.Path(book).read_bytes()


trained_on = {}


def recorded_load_splits(config, saved_vocab=None):
    splits = setup.load_splits(config, saved_vocab)
    trained_on["train_ids"] = hashlib.sha256(np.asarray(splits.train).tobytes()).hexdigest()
    trained_on["vocab"] = splits.vocab.to_json()
    return splits


sources.fetch_url = fake_fetch
loop.load_splits = recorded_load_splits
config, _ = parse_args([
    "--corpus=gutenberg:99", "--preprocess=d2l", "--batch_size=8", "--num_steps=8",
    "--num_hiddens=16", "--num_layers=1", "--cell=gru", "--num_train_steps=6", "--log_every=3",
    "--eval_every=6", "--checkpoint_every=6", "--eval_batch_size=2", "--optimizer=adam",
    "--lr=0.01", "--sample_length=4", "--notensorboard", f"--workdir={workdir}",
    "--multihost", f"--coordinator_address={address}", "--num_processes=2",
    f"--process_id={process_id}"])
summary = loop.train_and_evaluate(config, workdir)
tfds_dir = pathlib.Path(os.path.expanduser("~/tensorflow_datasets"))
with open(out, "w") as f:
    json.dump({"fetched": fetched, **trained_on, "final": summary["final"],
               "prepared": (tfds_dir / "deeprnn_text" / "gutenberg_99").is_dir()}, f)
