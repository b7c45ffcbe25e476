"""The fake gcloud of the TPU launcher tests (fake_gcloud.py), its test hooks, and the tiny
sweep of the TPU tests."""

import json
import os
import pathlib
import signal
import sys

import pytest

from tests.conftest import TINY_SWEEP

HERE = pathlib.Path(__file__).resolve().parent
# The TPU workers get the repository, so the TPU launcher takes only a flagfile in it (the
# tiny_sweep of tests/conftest.py has one in a temporary folder): the runs of tiny_sweep.
TPU_FLAGFILE = "experiments/time_machine_lstm.flags"
TPU_SWEEP = TINY_SWEEP.format(flagfile=TPU_FLAGFILE)


@pytest.fixture
def tpu_sweep(tmp_path):
    """(path of the sweep file `tiny.py`, its flagfile as the workers read it)."""
    (tmp_path / "tpu").mkdir()
    path = tmp_path / "tpu" / "tiny.py"  # tests/conftest.py's tiny_sweep is tmp_path/tiny.py
    path.write_text(TPU_SWEEP)
    return path, TPU_FLAGFILE


class FakeGcloud:
    """Hooks into the fake gcloud's state folder; see fake_gcloud.py for what each does."""

    def __init__(self, state_dir: pathlib.Path, monkeypatch):
        self.state_dir, self.monkeypatch = state_dir, monkeypatch

    def calls(self) -> list[list[str]]:
        path = self.state_dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def preempt(self, name: str) -> None:
        (self.state_dir / f"preempt-{name}").write_text("")

    def fail(self, verb: str, code: int, stderr: str, times: int = 1, match: str = "") -> None:
        path = self.state_dir / "fail.json"
        plans = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*plans, {"verb": verb, "code": code, "stderr": stderr,
                                             "times": times, "match": match}]))

    def workers(self, count: int) -> None:
        """From now on, ssh commands run on `count` fake workers per TPU."""
        self.monkeypatch.setenv("FAKE_GCLOUD_WORKERS", str(count))

    def behave(self, run: str, *outcomes: str) -> None:
        (self.state_dir / "behaviour").mkdir(exist_ok=True)
        (self.state_dir / "behaviour" / f"{run}.json").write_text(json.dumps(outcomes))

    def release(self, run: str) -> None:
        (self.state_dir / f"release-{run}").write_text("")

    def gcs(self, url: str) -> pathlib.Path:
        return self.state_dir / "gcs" / url.removeprefix("gs://")

    def tpus(self) -> set[str]:
        return {p.name.removeprefix("tpu-") for p in self.state_dir.glob("tpu-*")}

    def worker_file(self, tpu: str, worker: int, name: str) -> pathlib.Path:
        return self.state_dir / "workers" / tpu / str(worker) / "deeprnn-runs" / name

    def end_runs(self) -> None:
        """Kills what fake workers still run (a hung run), by the process groups they recorded."""
        for pgid_file in self.state_dir.glob("workers/*/*/deeprnn-runs/*.pgid"):
            try:
                os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    bin_dir, state_dir = tmp_path / "bin", tmp_path / "gcloud_state"
    bin_dir.mkdir()
    state_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_gcloud.py"} "$@"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state_dir))
    fake = FakeGcloud(state_dir, monkeypatch)
    yield fake
    fake.end_runs()
