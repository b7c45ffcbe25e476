"""Test session setup: one JAX compilation cache shared by this process and its subprocesses;
the `slow` marker; the tiny sweep of the launcher tests; an in-memory gs://. Shared helpers:
tests/helpers.py."""

import importlib.util
import os
import pathlib

import pytest

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache" / "tests"
_CACHE.mkdir(parents=True, exist_ok=True)
# Environment variables reach the subprocesses that tests start (python -m deeprnn.train ...).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# A two-run sweep for the launcher tests (launch/test_launch.py, launch/test_launch_tpu.py).
TINY_SWEEP = """
BASE_FLAGFILE = {flagfile!r}

def runs():
    yield "small", {{"cell": "gru", "num_layers": 1}}
    yield "deep", {{"cell": "lstm", "num_layers": 3}}, {{"eval_corpora": ["war_and_peace"]}}
"""


@pytest.fixture
def tiny_sweep(tmp_path):
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("--corpus=time_machine\n--num_train_steps=2\n")
    path = tmp_path / "tiny.py"
    path.write_text(TINY_SWEEP.format(flagfile=str(flagfile)))
    return path, flagfile


@pytest.fixture
def quick_compile():
    """For smoke tests that only check that a run works: most of XLA's optimisations off, so
    each small program compiles faster. Equality tests keep them: they compare numbers."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at 20 and 40) and the text file it trained on."""
    from tests.helpers import run, tiny_argv, write_text

    text = write_text(tmp_path_factory.mktemp("text") / "tiny.txt")
    workdir = tmp_path_factory.mktemp("finished")
    run(tiny_argv(text, workdir))
    return text, workdir
class FakeGCS(MemoryFileSystem):
    """An in-memory stand-in for gcsfs: object writes only, no appends, no real folders."""

    protocol = ("gs", "gcs")
    root_marker = ""

    def open(self, path, mode="rb", **kwargs):
        assert "a" not in mode, "GCS objects cannot be appended to"
        return super().open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// paths opened through etils.epath (what deeprnn uses) land in memory."""
    fake = FakeGCS(skip_instance_cache=True)
    fake.store, fake.pseudo_dirs = {}, [""]  # MemoryFileSystem shares these class-wide
    monkeypatch.setattr(
        epath_backend._FileSystemSpecBackend, "_get_filesystem", lambda self, name: fake
    )
    # It stands in for gcsfs, so deeprnn's check that gcsfs is installed must pass too.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: real_find_spec(
        "fsspec" if name == "gcsfs" else name, *args))
    return fake
