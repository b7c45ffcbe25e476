"""How the programs end when something outside the flags fails, or the flags are wrong in
ways absl lets through: one line, the right status, within seconds."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprnn.config import parse_args
from deeprnn.data import sources
from deeprnn.errors import UsageError
from deeprnn.model.generation import choose_next
from deeprnn.run import lifecycle
from deeprnn.run.lifecycle import RunFailed
from deeprnn.training.memory_check import check_fits
from deeprnn.training.setup import abstract_training_state, model_config_for
from tests.helpers import REPO, run, tiny_argv, write_text


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "tiny.txt")


def without_dac_override() -> list[str]:
    """Root ignores file permissions (CAP_DAC_OVERRIDE): drop it, as an ordinary user has."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_ends_the_run_in_seconds_with_one_line(text, tmp_path):
    """It used to print the line after 6 s, then hang ~300 s in Orbax's signalling threads
    and print 8 tracebacks."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints").chmod(0o555)
    started = time.monotonic()
    done = subprocess.run(
        [*without_dac_override(), sys.executable, "-m", "deeprnn.train",
         *tiny_argv(text, workdir, "--num_train_steps=4", "--eval_every=2",
                    "--checkpoint_every=2")],
        capture_output=True, text=True, cwd=REPO, timeout=240)
    took = time.monotonic() - started
    assert done.returncode == lifecycle.EXIT_FAILED, done.stderr[-2000:]
    assert took < 60, took
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"error: saving checkpoint step 2 in {workdir}/checkpoints "
                                "failed (Permission denied, errno 13)")
    assert "make the folder writable" in errors[0]
    assert errors[0].endswith(f"details in {workdir}/deeprnn.log")
    assert "Traceback" in (workdir / "deeprnn.log").read_text()
    assert not (workdir / lifecycle.LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_save_is_not_blamed_on_the_disk(text, tmp_path):
    done = cli("-m", "deeprnn.train", *tiny_argv(text, tmp_path, "--num_train_steps=40",
                                                 "--checkpoint_every=2"),
               env={lifecycle.CRASH_ENV: "sigint:after_step:6,sigint:in_save:6"})
    assert done.returncode == lifecycle.EXIT_INTERRUPTED, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        "stopped at once by a second Ctrl-C; the newest complete checkpoint is intact: run "
        "the same command to resume")


def test_a_failed_log_write_names_the_file_and_the_step(text, tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".json.tmp-" + str(os.getpid())):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunFailed, match=rf"cannot write {tmp_path}/summary.json at step 20: No "
                                        r"space left on device; free disk space"):
        run(tiny_argv(text, tmp_path))
    assert not list(tmp_path.glob("*.tmp-*"))  # no half-written file left behind


@pytest.mark.parametrize("program, flag", [("train", "sample_prefix"), ("generate", "prefix")])
def test_positional_arguments_are_refused(program, flag):
    """An unquoted --prefix=the time traveller used to generate from "the" alone."""
    done = cli("-m", f"deeprnn.{program}", "--workdir=/tmp/x", f"--{flag}=the", "time",
               "traveller")
    assert done.returncode == lifecycle.EXIT_USAGE
    assert done.stderr.startswith("error: unexpected argument(s) 'time' 'traveller': every "
                                  "setting is a --flag") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_help_exits_0(flag):
    done = cli("-m", "deeprnn.evaluate", flag)
    assert done.returncode == 0 and "--workdir" in done.stdout


@pytest.mark.parametrize("workdir, message", [
    ("s3://bucket/run", r"--workdir=s3://bucket/run: s3:// is not supported; use a local "
                        r"folder or gs://BUCKET/PATH"),
    ("gs://bucket/run", r"needs gcsfs to reach Cloud Storage: pip install -e '\.\[gcs\]'"),
    # It went to a folder named ~ in the current one: the shell expands no ~ after '='.
    ("~/runs/x", r"--workdir=~/runs/x: the shell does not expand ~ after '='; write "
                 r"--workdir=/.*/runs/x \(or --workdir ~/runs/x\)"),
])
def test_a_workdir_the_program_cannot_reach_is_one_line(workdir, message, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(UsageError, match=message):
        lifecycle.check_workdir_location(workdir)
    # The same for a corpus folder: --data_dir is read through the same layer.
    with pytest.raises(UsageError, match=message.replace("workdir", "data_dir")):
        sources.load_documents("time_machine", data_dir=workdir)
    if workdir.startswith("s3"):  # the gcsfs case depends on what this machine has installed
        for program, flag in (("train", "workdir"), ("corpora", "data_dir")):
            done = cli("-m", f"deeprnn.{program}", f"--{flag}={workdir}")
            assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
            assert f"--{flag}={workdir}: s3:// is not supported" in done.stderr


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_a_temperature_that_is_not_a_finite_number_is_refused(temperature, tmp_path):
    done = cli("-m", "deeprnn.generate", f"--workdir={tmp_path}",
               f"--temperature={temperature}")
    assert done.returncode == 2 and "--temperature must be a finite number" in done.stderr


def test_unk_is_never_generated():
    logits = jnp.asarray([[9.0, 1.0, 0.5], [5.0, 5.0, -3.0]])  # <unk> (id 0) the likeliest
    for temperature in (0.0, 1.0, 50.0):
        for seed in range(20):
            chosen = np.asarray(choose_next(logits, jnp.float32(temperature),
                                            jax.random.key(seed)))
            assert (chosen != 0).all()


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated(text, tmp_path):
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"the model needs at least .* GiB per device .*, and "
                                         r"the device has .* GiB; lower --num_hiddens"):
        run(tiny_argv(text, tmp_path / "huge", "--num_hiddens=100000000"))
    assert time.monotonic() - started < 30
    assert not (tmp_path / "huge").exists()


def test_the_compiled_step_is_measured_when_the_state_is_a_large_share(text):
    config, _ = parse_args(tiny_argv(text, "/unused", "--num_hiddens=64"))
    model_config = model_config_for(config, 30)
    state, carry = abstract_training_state(config, model_config)
    # A device a little larger than twice the state: the cheap floor passes, and the
    # compiled call's analysis (activations, temporaries) says it does not fit.
    params = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    with pytest.raises(UsageError, match=r"one training call needs .* GiB per device \(XLA's "
                                         r"memory analysis of the compiled step\)"):
        check_fits(config, model_config, state, carry, num_tokens=10_000, rows=16,
                   available=int(2.2 * params))
    check_fits(config, model_config, state, carry, num_tokens=10_000, rows=16,
               available=int(1000 * params))


def test_an_unwritable_evaluate_output_is_one_line(finished, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = cli("-m", "deeprnn.evaluate", f"--workdir={finished[1]}",
               f"--output={blocker}/result.json")
    # Refused before the scoring, as a usage error (test_flag_forms.py has the other cases).
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr == (f"error: --output={blocker}/result.json: {blocker} is a file, not a "
                           "folder; give a file path in a folder you can write\n")
