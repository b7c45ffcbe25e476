"""A run survives kills, preemption and non-finite steps, and resumes exactly.

Crashes are real: the training subprocess is SIGKILLed (no cleanup at all) at moments drawn
from a seed, one of them inside a checkpoint save (deeprnn.run.lifecycle.fault_point places it),
and restarted each time; the end result must equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deeprnn.errors import UsageError
from deeprnn.run import lifecycle
from deeprnn.run.checkpoints import COMPLETE_RECORD
from deeprnn.run.summary import read_summary
from deeprnn.run.writers import read_metrics
from deeprnn.training.trained_run import load_trained_run
from tests.helpers import REPO, run, tiny_argv, write_text

pytestmark = pytest.mark.slow  # every test here runs whole programs or workers

TOTAL_STEPS, SAVE_EVERY = 40, 6  # saves at 6, 12, ..., 36 and 40: most kills fall between
# The LSTM's bounded gates survive huge steps for a while: with these the loss of this text
# overflows at step 3 (measured), after two finite steps.
BLOW_UP = ("--optimizer=sgd", "--lr=1e36", "--clip_norm=1e36")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "tiny.txt")


def argv_for(text, workdir, *extra):
    # Sequential sampler and dropout: the carried state and the dropout key must resume too.
    return tiny_argv(text, workdir, f"--num_train_steps={TOTAL_STEPS}",
                     f"--checkpoint_every={SAVE_EVERY}", "--sampler=sequential",
                     "--dropout=0.1", *extra)


@pytest.fixture(scope="module")
def uninterrupted(text_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(argv_for(text_file, workdir))
    return workdir


def train_subprocess(argv, crash_at="", **kwargs):
    env = {**os.environ, lifecycle.CRASH_ENV: crash_at}
    return subprocess.Popen([sys.executable, "-m", "deeprnn.train", "--verbosity=-1", *argv],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def complete_steps_in(directory) -> list[int]:
    return sorted(int(p.parent.name) for p in directory.glob(f"*/{COMPLETE_RECORD}"))


def complete_steps(workdir) -> list[int]:
    return complete_steps_in(workdir / "checkpoints")


def assert_same_results(workdir, reference):
    a, b = read_metrics(str(reference)), read_metrics(str(workdir))
    assert [r["step"] for r in b] == [r["step"] for r in a]  # none missing, none twice
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if key != "train/tokens_per_sec":  # wall-clock
                assert rb[key] == ra[key], (ra["step"], key)
    jax.tree.map(np.testing.assert_array_equal, load_trained_run(str(reference)).params,
                 load_trained_run(str(workdir)).params)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(5, TOTAL_STEPS + 1, 5))  # TensorBoard purged the redone steps


@pytest.mark.parametrize("seed", [0])
def test_killed_and_interrupted_run_resumes_exactly(seed, text_file, uninterrupted, tmp_path,
                                                    monkeypatch):
    rng = np.random.default_rng(seed)
    kill_step = int(rng.integers(2, 12))  # SIGKILL right after a training step
    saves = [s for s in range(SAVE_EVERY, TOTAL_STEPS, SAVE_EVERY) if s > kill_step + 6]
    record_step, write_step = sorted(rng.choice(saves[:-1], 2, replace=False))
    term_step = write_step + int(rng.integers(1, SAVE_EVERY))  # between two saves
    argv = argv_for(text_file, tmp_path)

    first = train_subprocess(argv, f"kill:after_step:{kill_step}")
    assert first.wait(120) == -signal.SIGKILL, first.stderr.read()[-2000:]
    assert all(s < kill_step for s in complete_steps(tmp_path))
    # The dead run's lock is stale: the kernel dropped its flock, so the restart goes ahead.
    assert json.loads((tmp_path / lifecycle.LOCK_FILE).read_text())["pid"] == first.pid

    # Killed after Orbax finished step `record_step` but before its completion record.
    second = train_subprocess(argv, f"kill:before_record:{record_step}")
    assert second.wait(120) == -signal.SIGKILL, second.stderr.read()[-2000:]
    assert (tmp_path / "checkpoints" / str(record_step)).is_dir()
    assert max(complete_steps(tmp_path)) < record_step

    # Killed while Orbax writes step `write_step`; this restart reports the incomplete step.
    third = train_subprocess(argv, f"kill:in_save:{write_step}")
    assert third.wait(120) == -signal.SIGKILL
    assert f"ignoring incomplete checkpoint step(s) [{record_step}]" in third.stderr.read()
    assert write_step not in complete_steps(tmp_path)

    # Ctrl-C between two saves, in-process (the real handler; SIGTERM's exit status is the
    # next test's): a checkpoint of the step it was on, and the previous handler back.
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setenv(lifecycle.CRASH_ENV, f"sigint:after_step:{term_step}")
    with pytest.raises(lifecycle.Preempted, match=f"stopped by SIGINT after step {term_step}"):
        run(argv)
    assert signal.getsignal(signal.SIGINT) is handler
    assert max(complete_steps(tmp_path)) == term_step
    monkeypatch.delenv(lifecycle.CRASH_ENV)

    summary = run(argv)  # the last restart runs to the end, in-process
    assert summary["steps_done"] == TOTAL_STEPS and summary["finished"]
    assert_same_results(tmp_path, uninterrupted)


def test_sigterm_from_outside_checkpoints_and_exits_75_within_seconds(text_file, tmp_path):
    argv = tiny_argv(text_file, tmp_path, "--num_train_steps=100000", "--checkpoint_every=10",
                     "--eval_every=50")
    proc = train_subprocess(argv)
    deadline = time.monotonic() + 120
    while not complete_steps(tmp_path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)

    # One writer per workdir: a second run is refused while the first is alive.
    with pytest.raises(UsageError, match=rf"is in use by another run \(pid {proc.pid} on "):
        run(argv)

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(60)
    took = time.monotonic() - signalled
    stderr = proc.stderr.read()
    assert status == lifecycle.EXIT_PREEMPTED, stderr[-2000:]
    assert took < 20, took  # a step, a checkpoint of a tiny model and the logs
    step = read_summary(str(tmp_path))["steps_done"]
    assert f"stopped by SIGTERM after step {step}" in stderr
    assert max(complete_steps(tmp_path)) == step
    metric_steps = [r["step"] for r in read_metrics(str(tmp_path))]
    assert metric_steps == sorted(set(metric_steps)) and metric_steps[-1] <= step
    assert load_trained_run(str(tmp_path)).step == step


def test_lock_left_by_a_dead_process_does_not_block(tmp_path, caplog, fake_gcs):
    holder = subprocess.run(
        [sys.executable, "-c", "import sys; from deeprnn.run.lifecycle import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held')", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPO)
    assert holder.stdout.strip() == "held"  # it exited holding the lock
    with lifecycle.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / lifecycle.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}"):
            lifecycle.WorkdirLock(str(tmp_path)).acquire()
    # GCS has no lock that a killed run releases: none is taken, and the log says so.
    lifecycle.WorkdirLock("gs://bucket/run").acquire().release()
    assert "gs://bucket/run is remote: no workdir lock" in caplog.text
    assert fake_gcs.find("gs://bucket") == []  # its write check left nothing behind


def test_an_unwritable_gcs_workdir_stops_the_run_before_training(text_file, fake_gcs,
                                                                   monkeypatch):
    """A TPU VM whose service account or scopes cannot write the bucket: one line naming the
    bucket and the fix, before any step (not at the first checkpoint, after the work)."""
    def refuse(*args, **kwargs):
        raise PermissionError("403 POST https://storage.googleapis.com/upload: "
                              "sa@p.iam.gserviceaccount.com does not have "
                              "storage.objects.create access\nto the bucket")
    monkeypatch.setattr(fake_gcs, "open", refuse)
    monkeypatch.setattr(fake_gcs, "pipe_file", refuse)
    trained = []
    monkeypatch.setattr("deeprnn.training.loop.Trainer.run", lambda self: trained.append(1))
    with pytest.raises(UsageError) as refused:
        run(tiny_argv(text_file, "gs://bkt/sweep/run"))
    message = str(refused.value)
    assert message.startswith("cannot write to --workdir=gs://bkt/sweep/run (403 POST ")
    assert "write access to bucket bkt" in message and "--service_account=" in message
    assert "\n" not in message and trained == []


def test_non_finite_stops_naming_step_metric_and_last_good_checkpoint(text_file, tmp_path):
    argv = tiny_argv(text_file, tmp_path, *BLOW_UP, "--num_train_steps=20",
                     "--checkpoint_every=1", "--log_every=1", "--eval_every=20")
    pattern = (r"non-finite (loss|grad_norm|parameters).* at step (\d+); "
               r"last good checkpoint: step (\d+)")
    with pytest.raises(UsageError, match=pattern) as info:
        run(argv)
    bad_step, last_good = (int(x) for x in re.search(pattern, str(info.value)).groups()[1:])
    assert last_good < bad_step and max(complete_steps(tmp_path)) == last_good
    params = load_trained_run(str(tmp_path)).params
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_nan_policy_skip_skips_non_finite_losses_and_stops_when_a_window_is_all_skipped(
        text_file, tmp_path):
    """A step this large makes the parameters overflow: losses turn non-finite while some
    gradients stay finite. Each such update is skipped and counted (not applied), and once a
    whole logging window is skipped the run stops as under --nan_policy=stop."""
    argv = tiny_argv(text_file, tmp_path, "--optimizer=sgd", "--lr=3e38", "--clip_norm=3e38",
                     "--num_train_steps=40", "--nan_policy=skip", "--log_every=5",
                     "--eval_every=5", "--checkpoint_every=5")
    with pytest.raises(UsageError, match=r"non-finite loss or gradient in every update of "
                                         r"steps (\d+)-(\d+) \(all skipped\)") as info:
        run(argv)
    records = read_metrics(str(tmp_path))
    skipped = [r["train/skipped_updates"] for r in records if "train/skipped_updates" in r]
    assert skipped and skipped[-1] > 0
    assert all(r["train/loss_steps"] <= 5 for r in records if "train/loss_steps" in r)
    # Nothing non-finite was applied, saved or kept as the best.
    params = load_trained_run(str(tmp_path)).params
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    for record in records:
        if "validation/perplexity" in record:  # inf where it overflows, never 305 digits
            assert record["validation/perplexity"] < 1e300 or record["validation/perplexity"] \
                == float("inf")
    scores = [r["validation/perplexity"] for r in records if "validation/perplexity" in r]
    assert (tmp_path / "best").exists() == any(math.isfinite(v) for v in scores)
    assert "last good checkpoint: step" in str(info.value)


def test_two_processes_agree_on_the_preemption_step(tmp_path):
    # Ctrl-C on process 1: its handler forwards SIGTERM to JAX's preemption service, which
    # tells process 0; Orbax's reached_preemption turns true on both at the same step.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    worker = pathlib.Path(__file__).with_name("preemption_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker),
                               address, str(i), str(tmp_path)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    try:
        for proc in procs:
            while (line := proc.stdout.readline()) and line.strip() != "running":
                pass  # gloo's connection lines
            assert line, proc.stderr.read()[-2000:]
        procs[1].send_signal(signal.SIGINT)
        outs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    stops = [out.split() for out, _ in outs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert stops[0][0] == "stopped" and stops[0] == stops[1]
    assert complete_steps_in(tmp_path) == [int(stops[0][1])]


def test_parameter_check_before_a_save_sees_every_leaf():
    from deeprnn.training.progress import all_finite as _all_finite

    good = {"W": jax.numpy.ones((2, 3)), "b": [np.zeros(3, np.float32), jax.numpy.arange(4.0)]}
    assert _all_finite(good)
    for bad in (np.inf, -np.inf, np.nan):
        tree = {**good, "b": [np.array([0.0, bad, 1.0], np.float32), good["b"][1]]}
        assert not _all_finite(tree)
    assert not _all_finite({**good, "W": good["W"].at[1, 2].set(np.nan)})
