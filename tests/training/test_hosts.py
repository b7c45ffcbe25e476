"""Multi-host programs: every process loads its own copy of the corpus and all must agree;
evaluation runs on every process together and process 0 alone writes the result.

The collectives are injected for the one-process tests; the slow tests run two processes as one
JAX system over 127.0.0.1, each with a HOME of its own (as the workers of a TPU pod slice have).
"""

import json
import os
import sys

import numpy as np
import pytest

from deeprnn.data.sources import Document
from deeprnn.errors import UsageError
from deeprnn.training import hosts
from deeprnn.training.trained_run import score_corpus
from tests.helpers import REPO, SENTENCES, free_port, run, run_together, tiny_argv, write_text

WORKER = REPO / "tests" / "training" / "hosts_worker.py"


def doc(text: str, name: str = "time_machine") -> Document:
    return Document(name, text, "H. G. Wells", "The Time Machine", "sha")


class Collectives:
    """What the other process contributes to the two collectives, and the order of calls."""

    def __init__(self, process_0_ok=True, other_row=None):
        self.process_0_ok, self.other_row, self.calls = process_0_ok, other_row, []

    def broadcast(self, value):
        self.calls.append("broadcast")
        return np.int32(self.process_0_ok) if self.other_row is not None else value

    def allgather(self, row):
        self.calls.append("allgather")
        return np.stack([row, self.other_row] if self.other_row is not None
                        else [row, hosts._row([doc("same")], 1)])


def load_as(process_index, collectives, load):
    return hosts.load_on_every_host(["time_machine"], load, process_index=process_index,
                                    process_count=2, broadcast=collectives.broadcast,
                                    allgather=collectives.allgather)


def test_one_process_just_loads():
    assert hosts.load_on_every_host(["x"], lambda: [doc("a")], process_count=1) == [doc("a")]


def test_process_zero_loads_before_the_others_look():
    """So that a TFDS folder the hosts share is prepared once, by process 0."""
    order = Collectives(other_row=hosts._row([doc("same")], 1))

    def load():
        order.calls.append("load")
        return [doc("same")]
    assert load_as(1, order, load) == [doc("same")]
    assert order.calls == ["broadcast", "load", "allgather"]
    order.calls.clear()
    load_as(0, order, load)
    assert order.calls == ["load", "broadcast", "allgather"]


def test_hosts_that_read_different_text_stop_naming_the_document():
    other = Collectives(other_row=hosts._row([doc("a re-issued text")], 1))
    with pytest.raises(UsageError, match="processes 0 and 1 read different text for "
                                         "time_machine; give every host the same copy"):
        load_as(0, other, lambda: [doc("the text")])


def test_a_process_that_cannot_load_stops_every_process():
    # Process 1 failed: process 0 learns it from the gathered rows, process 1 raises its own.
    failed = Collectives(other_row=hosts._row(None, 1))
    with pytest.raises(UsageError, match="process 1 could not load --corpus; see its log"):
        load_as(0, failed, lambda: [doc("the text")])

    def broken():
        raise UsageError("cannot download time_machine")
    with pytest.raises(UsageError, match="cannot download time_machine"):
        load_as(1, Collectives(other_row=hosts._row([doc("t")], 1)), broken)
    # Process 0 failed: the others stop at once, without loading.
    with pytest.raises(UsageError, match="process 0 could not load --corpus"):
        load_as(1, Collectives(process_0_ok=False, other_row=hosts._row(None, 1)),
                lambda: pytest.fail("loaded after process 0 failed"))


def worker_envs(tmp_path, count: int = 2) -> list[dict]:
    """One environment per process: a HOME of its own, one CPU device, this tree first."""
    envs = []
    for i in range(count):
        home = tmp_path / f"home{i}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", "XLA_FLAGS")}
        env.update(HOME=str(home), JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        envs.append(env)
    return envs


@pytest.mark.slow
def test_two_hosts_with_their_own_homes_download_and_train_on_identical_ids(tmp_path):
    """As on a pod slice: no mirror, each worker's ~/tensorflow_datasets its own. Each process
    downloads and prepares its own copy, and both train one model on the same token ids."""
    book = tmp_path / "book.txt"
    body = ". ".join(SENTENCES[i % len(SENTENCES)] for i in range(150))
    book.write_text("Title: A Test Book\nAuthor: Ann Writer\n\n*** START OF THE PROJECT "
                    f"GUTENBERG EBOOK ***\n{body}.\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n")
    address = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    run_together([[sys.executable, str(WORKER), str(outs[i]), str(book), address, str(i),
                   str(tmp_path / "workdir")] for i in range(2)], worker_envs(tmp_path),
                 [tmp_path / f"log{i}.txt" for i in range(2)], timeout_s=240)
    first, second = (json.loads(out.read_text()) for out in outs)
    for result in (first, second):  # each its own download, prepared in its own home
        assert result["fetched"] == ["https://www.gutenberg.org/cache/epub/99/pg99.txt"]
        assert result["prepared"]
    assert first["train_ids"] == second["train_ids"] and first["vocab"] == second["vocab"]
    assert first["final"] == second["final"] and first["final"]["test/perplexity"] > 1


@pytest.mark.slow
def test_two_hosts_evaluate_together_and_process_zero_alone_writes(tmp_path):
    """What launch.tpu runs on every worker of a pod slice after training."""
    workdir = tmp_path / "run"
    run(tiny_argv(write_text(tmp_path / "text.txt"), workdir, "--num_train_steps=4",
                  "--eval_every=4", "--checkpoint_every=4", "--notensorboard"))
    alone = score_corpus(str(workdir), None, None, "test")  # this process, one device
    result, address = tmp_path / "eval" / "result.json", f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    run_together([[sys.executable, "-m", "deeprnn.evaluate", f"--workdir={workdir}",
                   "--split=test", f"--output={result}", "--multihost",
                   f"--coordinator_address={address}", "--num_processes=2",
                   f"--process_id={i}"] for i in range(2)], worker_envs(tmp_path), logs,
                 timeout_s=240)
    together = json.loads(result.read_text())
    assert together["tokens"] == alone["tokens"]  # the whole split, each stream on one host
    assert together["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert '"perplexity"' in logs[0].read_text()  # printed by process 0 alone
    assert '"perplexity"' not in logs[1].read_text()
