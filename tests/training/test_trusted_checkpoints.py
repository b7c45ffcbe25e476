"""Checkpoints that cannot lie: digests checked on every restore, damaged ones set aside, and
resumes refused or adapted when they would silently change the run."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from deeprnn.errors import UsageError
from deeprnn.run.checkpoints import COMPLETE_RECORD, DAMAGED_DIR, RunCheckpoints
from deeprnn.run.summary import read_summary
from deeprnn.run.writers import METRICS_FILE, read_metrics
from deeprnn.training.trained_run import load_trained_run, score_corpus
from tests.helpers import run, tiny_argv, write_text

# A restore that fails on a damaged file leaves tensorstore's other reads pending; those the
# test's own teardown collects are ignored here, those collected at exit by pyproject's filter.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def copy_of(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished[1], workdir)
    return workdir


def array_files(step_dir):
    """The files that hold the state's array data (Orbax's OCDBT data folder)."""
    return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


def damage(step_dir, how: str) -> None:
    if how == "another_state":  # a copy or hand edit: every file reads, the values are wrong
        shutil.rmtree(step_dir / "state")
        shutil.copytree(step_dir.parent / "20" / "state", step_dir / "state")
        return
    target = array_files(step_dir)[-1]
    data = bytearray(target.read_bytes())
    if how == "flip_a_byte":  # what a disk does; the compressed chunk may or may not decode
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    else:
        os.truncate(target, len(data) // 2)


@pytest.mark.parametrize("how", ["another_state", "flip_a_byte", "truncate"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        finished, tmp_path, how, caplog, capsys):
    workdir = copy_of(finished, tmp_path)
    damage(workdir / "checkpoints" / "40", how)
    with caplog.at_level(logging.WARNING):
        summary = run(tiny_argv(finished[0], workdir, "--num_train_steps=60"))
    assert "resuming from step 20" in capsys.readouterr().err
    aside = workdir / "checkpoints" / DAMAGED_DIR / "40"
    assert aside.is_dir() and not (workdir / "checkpoints" / "40").exists() or (
        workdir / "checkpoints" / "40" / COMPLETE_RECORD).exists()  # saved again at step 40
    assert "checkpoints/40 is marked complete but" in caplog.text
    assert f"moved it to {aside}" in caplog.text
    assert summary["finished"] and summary["steps_done"] == 60
    steps = [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(5, 61, 5))  # 25..40 logged once, again


def test_generate_and_evaluate_fall_back_with_a_warning_and_old_records_still_load(
        finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    damage(workdir / "checkpoints" / "40", "another_state")
    with caplog.at_level(logging.WARNING):
        assert load_trained_run(str(workdir)).step == 20
    assert "fail their digests" in caplog.text and "passing over it" in caplog.text
    # It holds no lock: a training run on the workdir, not it, moves the folder aside.
    assert (workdir / "checkpoints" / "40").is_dir()
    assert not (workdir / "checkpoints" / DAMAGED_DIR).exists()
    # A checkpoint written before digests existed has none: it loads as before.
    record = workdir / "checkpoints" / "20" / COMPLETE_RECORD
    record.write_text(json.dumps({"step": 20}))
    assert load_trained_run(str(workdir)).step == 20


def test_a_checkpoint_deleted_while_it_is_read_is_passed_over(finished, tmp_path, monkeypatch):
    """generate beside a training run: max_to_keep deletes the newest one being read."""
    workdir = copy_of(finished, tmp_path)
    real_restore = RunCheckpoints.restore

    def restore_as_it_vanishes(self, step, *args):
        if step == 40 and (self.directory / "40").exists():
            shutil.rmtree(self.directory / "40")  # another process's max_to_keep, mid-read
        return real_restore(self, step, *args)

    monkeypatch.setattr(RunCheckpoints, "restore", restore_as_it_vanishes)
    assert load_trained_run(str(workdir)).step == 20
    assert not (workdir / "checkpoints" / DAMAGED_DIR).exists()  # not called damaged


def test_reading_the_newest_checkpoint_reads_its_metadata_once(finished, tmp_path,
                                                                monkeypatch):
    """Each read is a round trip on a gs:// workdir; the state's structure and the restore
    share one."""
    workdir = copy_of(finished, tmp_path)
    reads = []
    real_read_meta = RunCheckpoints.read_meta

    def counted(self, step, *args):
        reads.append(step)
        return real_read_meta(self, step, *args)

    monkeypatch.setattr(RunCheckpoints, "read_meta", counted)
    assert load_trained_run(str(workdir)).step == 40
    assert reads == [40]


@pytest.mark.parametrize("first, then", [("stop", "skip"), ("skip", "stop")])
def test_resume_with_another_nan_policy(text_file_small, tmp_path, first, then):
    """The optimizer state's tree differs between the policies; a resume adopts the new one
    (a run stopped by a non-finite loss is told to resume with --nan_policy=skip)."""
    argv = tiny_argv(text_file_small, tmp_path, "--num_train_steps=20", "--eval_every=10",
                     "--checkpoint_every=10")
    run([*argv, f"--nan_policy={first}"])
    summary = run([*argv, "--num_train_steps=30", f"--nan_policy={then}"])
    assert summary["steps_done"] == 30 and summary["finished"]


@pytest.fixture(scope="module")
def text_file_small(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("small") / "tiny.txt")


def test_dropout_is_refused_and_eval_batch_size_warned_on_resume(finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    with pytest.raises(UsageError, match=r"--dropout \(checkpoint 0.0, now 0.3\)"):
        run(tiny_argv(finished[0], workdir, "--num_train_steps=60", "--dropout=0.3"))
    with caplog.at_level(logging.WARNING):
        run(tiny_argv(finished[0], workdir, "--num_train_steps=60", "--eval_batch_size=4"))
    assert "--eval_batch_size is 4, the checkpoint's 2" in caplog.text


def test_a_torn_last_line_of_the_metrics_is_repaired_and_one_in_the_middle_refused(
        finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    metrics = workdir / METRICS_FILE
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    with caplog.at_level(logging.WARNING):
        assert len(read_metrics(str(workdir))) == len(lines)
    assert "is cut off" in caplog.text
    run(tiny_argv(finished[0], workdir, "--num_train_steps=60"))
    assert all(json.loads(line) for line in metrics.read_text().splitlines())
    torn = lines[:3] + [lines[3][:10]] + lines[4:]
    metrics.write_text("\n".join(torn) + "\n")
    with pytest.raises(UsageError, match=f"line 4 of {len(lines)} is not JSON .*repair that "
                                         "line or delete it"):
        read_metrics(str(workdir))


def test_a_resumed_run_reports_time_and_speed_over_all_its_processes(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    first = read_summary(str(workdir))
    summary = run(tiny_argv(finished[0], workdir, "--num_train_steps=60"))
    assert summary["wall_time_s"] > first["wall_time_s"]
    assert summary["tokens_per_sec"] > 0
    # Resumed at its last step (nothing left to train): the earlier processes' speed, not 0.
    (workdir / "summary.json").unlink()
    again = run(tiny_argv(finished[0], workdir, "--num_train_steps=60"))
    assert again["tokens_per_sec"] == pytest.approx(summary["tokens_per_sec"], rel=0.5)
    assert again["wall_time_s"] >= summary["wall_time_s"] * 0.9


def test_a_partly_deleted_folder_is_not_called_a_stopped_save(finished, tmp_path, caplog):
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "40" / "state")  # someone's rm -r, cut short
    (workdir / "checkpoints" / "40" / COMPLETE_RECORD).unlink()
    with caplog.at_level(logging.WARNING):
        assert load_trained_run(str(workdir)).step == 20
    assert ("ignoring incomplete checkpoint step(s) [40]" in caplog.text
            and "a save that did not finish, or a folder partly deleted" in caplog.text)


def test_another_runs_logs_without_a_checkpoint_are_refused_not_written_over(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    shutil.rmtree(workdir / "checkpoints")  # its checkpoints deleted, its logs and best/ left
    kept = [workdir / METRICS_FILE, workdir / "summary.json", *(workdir / "best").rglob("*")]
    before = {path: path.read_bytes() for path in kept if path.is_file()}
    with pytest.raises(UsageError, match=r"holds the logs of another run and no checkpoint .*"
                                         r"--num_hiddens \(checkpoint 24, now 32\)"):
        run(tiny_argv(finished[0], workdir, "--num_hiddens=32"))
    assert {path: path.read_bytes() for path in before} == before


def test_a_start_over_scores_its_own_best_not_one_an_earlier_start_left(finished, tmp_path):
    """An earlier start (here seed 0's) crashed after saving best/ and before its first
    checkpoint; this start, with another seed, must not take that best/ for its own."""
    text, short = finished[0], "--num_train_steps=20"  # one evaluation: best/ is at step 20
    run(tiny_argv(text, tmp_path / "earlier", short))
    own = run(tiny_argv(text, tmp_path / "fresh", short, "--seed=7"))
    workdir = tmp_path / "restarted"
    workdir.mkdir()
    shutil.copytree(tmp_path / "earlier" / "best", workdir / "best")
    summary = run(tiny_argv(text, workdir, short, "--seed=7"))
    assert summary["final"] == own["final"]


def test_evaluate_says_when_the_runs_own_text_changed_since_training(finished, caplog):
    text, workdir = finished
    assert not score_corpus(str(workdir), None, None, "test")["text_changed_since_training"]
    good = text.read_bytes()
    try:
        text.write_bytes(b"the fire burned in the room. " * 60)
        with caplog.at_level(logging.WARNING):
            result = score_corpus(str(workdir), None, None, "test")
    finally:
        text.write_bytes(good)
    assert result["text_changed_since_training"]
    assert "tiny.txt changed since the checkpoint" in caplog.text
    assert "not the run's held-out scores" in caplog.text
