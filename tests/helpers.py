"""What several test modules share: the repository's paths, tiny text written by the tests, a
tiny training run in-process, and processes started together as one JAX system."""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import time

import numpy as np

from deeprnn.config import parse_args

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_CORPORA = REPO.parent / "shared" / "corpora"
INFO_LOG_LINE = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix: I<month><day>
SENTENCES = ["the time traveller smiled", "we sat and watched the machine",
             "the traveller spoke of time", "a small machine of brass and ivory",
             "the fire burned in the room", "he held the lever in his hand"]


def write_text(path: pathlib.Path, n: int = 400, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    path.write_text(". ".join(SENTENCES[i] for i in rng.integers(0, len(SENTENCES), n)) + ".\n")
    return path


def tiny_argv(text: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    # Adam, not the book's SGD: it learns this text within the few steps a test can afford.
    return [f"--corpus=file:{text}", "--preprocess=d2l", "--batch_size=16", "--num_steps=16",
            "--num_hiddens=24", "--num_layers=2", "--cell=lstm", "--num_train_steps=40",
            "--log_every=5", "--eval_every=20", "--checkpoint_every=20", "--eval_batch_size=2",
            "--optimizer=adam", "--lr=0.01", "--sample_length=12", f"--workdir={workdir}",
            *extra]


def run(argv):
    """`python -m deeprnn.train ARGV`, in this process; returns the run's summary."""
    from deeprnn.training.loop import train_and_evaluate  # JAX after conftest's settings

    config, workdir = parse_args(argv)
    return train_and_evaluate(config, workdir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_together(commands: list[list[str]], envs: list[dict], logs: list[pathlib.Path],
                 timeout_s: float) -> None:
    """Starts processes that work together (one JAX system) and waits for all of them; fails
    the test, with the log's tail, on a non-zero exit. Output goes to files: a full pipe would
    stall one process and so all of them, in a collective."""
    procs, deadline = [], time.monotonic() + timeout_s
    try:
        for command, env, log in zip(commands, envs, logs, strict=True):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(command, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, cwd=REPO))
        for proc, log in zip(procs, logs, strict=True):
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
            assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        for proc in procs:  # a hung collective must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
