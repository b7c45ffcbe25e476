"""The bad-input matrix: each case is one clear line naming the problem and the fix, a non-zero
exit, and nothing in the workdir written over.

Most cases run in-process against the workdir of a finished run and compare every file in it
(bytes) before and after. Only what needs a real process runs as one: the command line's
output and status, and a disk that fills up during a checkpoint save.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from deeprnn.errors import UsageError
from deeprnn.run import lifecycle
from deeprnn.run.checkpoints import COMPLETE_RECORD
from deeprnn.training.trained_run import load_trained_run
from tests.helpers import REPO, run, tiny_argv


def snapshot(workdir: pathlib.Path) -> dict[str, str]:
    """Every file of a workdir (but the lock, which names its latest holder) by content."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != lifecycle.LOCK_FILE}


def refused(argv, match, workdir):
    """Runs argv, expecting a one-line UsageError matching `match` and no change in workdir."""
    before = snapshot(workdir)
    with pytest.raises(UsageError, match=match) as info:
        run(argv)
    assert "\n" not in str(info.value)
    assert snapshot(workdir) == before


CHANGED = r"tiny.txt changed since the checkpoint \(sha256 .*\): the run trained on other text"


@pytest.mark.parametrize("content, match, on_resume", [
    (None, r"cannot read .*tiny.txt: No such file or directory; check the path", None),
    (b"", r"holds no text; point the corpus spec at a non-empty file", None),
    (b"caf\xe9 au lait " * 200, r"is not UTF-8 text \(byte 0xe9 at offset 3\); convert it", None),
    (b"the time machine. " * 5, r"too short for one sequential batch .*lower --batch_size",
     CHANGED),
    (b"the fire burned in the room. " * 60, r"this text trains", CHANGED),
], ids=["missing", "empty", "not_utf8", "shorter_than_a_window", "another_text"])
def test_corpus_problems(content, match, on_resume, finished, tmp_path):
    """Bad text refuses a new run and leaves no trace of it; a finished run whose text changed
    (bad or not) is refused on resume and keeps every file as it was."""
    text, workdir = finished
    good = text.read_bytes()
    try:
        text.unlink()
        if content is not None:
            text.write_bytes(content)
        refused(tiny_argv(text, workdir, "--num_train_steps=60"), on_resume or match, workdir)
        fresh = tmp_path / "new_run"
        if match == "this text trains":  # another good text: a new run trains on it
            assert run(tiny_argv(text, fresh, "--num_train_steps=2"))["steps_done"] == 2
        else:
            with pytest.raises(UsageError, match=match):
                run(tiny_argv(text, fresh, "--num_train_steps=60"))
            assert not fresh.exists()  # checked before anything is written; the lock is gone
    finally:
        text.write_bytes(good)


@pytest.mark.parametrize("extra, match", [
    (["--num_layers=0"], r"--num_layers must be at least 1, got 0"),
    (["--lr=-1"], r"--lr must be a positive number"),
    (["--cell=transformer"], r"--cell='transformer' is not one of rnn, gru, lstm"),
    (["--dropout=1.5"], r"--dropout must be in \[0, 1\)"),
    (["--num_layers=two"], r"flag --num_layers=two: invalid literal"),
    (["--cell=gru", "--gru_variant=d2l", "--impl=flax"], r"--impl=flax has no d2l-variant GRU"),
    (["--multihost", "--coordinator_address=127.0.0.1:1"], r"needs all of --coordinator"),
    # Multi-host flags went to JAX unchecked (ValueError, IndexError), or were ignored.
    (["--multihost", "--coordinator_address=nonsense", "--num_processes=2", "--process_id=1"],
     r"--coordinator_address='nonsense' is not HOST:PORT; give process 0's host and a free"),
    (["--multihost", "--coordinator_address=localhost:1", "--num_processes=2",
      "--process_id=5"], r"--process_id=5 must be in \[0, 1\]"),
    (["--num_processes=3"], r"--num_processes=3 applies only with --multihost; add"),
    # Integers past int64 ended in OverflowError tracebacks.
    (["--seed=99999999999999999999"], r"--seed=9+ is out of range; give a seed in \[0, "
                                      r"4294967295\]"),
    (["--seed=4294967295", "--num_seeds=2"], r"trains seeds up to 4294967296, above"),
    (["--num_hiddens=99999999999999999999"], r"--num_hiddens=9+ is too large; give at most "
                                             r"134217728"),
    (["--sample_length=99999999999999999999"], r"--sample_length=9+ is too large"),
    (["--no_such_flag=1"], r"Unknown command line flag 'no_such_flag'"),
    (["--flagfile=/nonexistent.flags"], r"Unable to open flagfile"),
    (["--eval_batch_size=400"], r"validation split has \d+ tokens, too few for "
                                r"--eval_batch_size=400"),
    (["--num_hiddens=32", "--cell=gru"], r"--cell \(checkpoint 'lstm', now 'gru'\); "
                                         r"--num_hiddens \(checkpoint 24, now 32\); use another"),
], ids=["zero_layers", "negative_lr", "bad_choice", "dropout_range", "not_a_number",
        "conflict", "multihost_partial", "multihost_address", "multihost_process_id",
        "num_processes_alone", "huge_seed", "seeds_past_32_bits", "huge_num_hiddens",
        "huge_sample_length", "unknown_flag", "missing_flagfile",
        "held_out_too_short", "model_flags_differ_on_resume"])
def test_flag_problems(extra, match, finished):
    text, workdir = finished
    refused(tiny_argv(text, workdir, "--num_train_steps=60", *extra), match, workdir)


@pytest.mark.parametrize("extra", [["--sample_prefix="],
                                   ["--preprocess=d2l_lines", "--sample_prefix=123"]])
def test_a_sample_prefix_nothing_is_left_of_is_refused_before_training(extra, finished,
                                                                        tmp_path):
    """It failed at the first sample, after training, leaving a workdir with only best/."""
    fresh = tmp_path / "new_run"
    with pytest.raises(UsageError, match=r"--sample_prefix='1?2?3?' is empty after "
                                         r"--preprocess=d2l(_lines)?; give a prefix"):
        run(tiny_argv(finished[0], fresh, *extra))
    assert not fresh.exists()


def test_unwritable_workdir(finished, tmp_path):
    text, _ = finished
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a folder")
    with pytest.raises(UsageError, match=r"cannot write to --workdir=.*a_file/run \(Not a "
                                         r"directory\); choose a folder you can write"):
        run(tiny_argv(text, regular_file / "run"))


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'; see "),
    (["--flagfile=/nonexistent.flags"], "error: Unable to open flagfile: "),
    (["--num_layers=0", "--workdir=/tmp/x"], "error: --num_layers must be at least 1, got 0"),
], ids=["unknown_flag", "missing_flagfile", "invalid_value"])
def test_command_line_prints_one_error_line_and_exits_2(args, message):
    out = cli("-m", "deeprnn.train", *args)
    assert out.returncode == lifecycle.EXIT_USAGE
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("program", ["generate", "evaluate", "report", "corpora"])
def test_every_program_prints_one_error_line_for_an_unknown_flag(program):
    out = cli("-m", f"deeprnn.{program}", "--no_such_flag=1")
    assert out.returncode == lifecycle.EXIT_USAGE
    assert out.stderr == (f"error: Unknown command line flag 'no_such_flag'; see python -m "
                          f"deeprnn.{program} --helpfull\n"), out.stderr


@pytest.mark.slow
def test_full_disk_during_a_save_fails_clearly_and_keeps_the_last_checkpoint(finished,
                                                                              tmp_path):
    text, original = finished
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    before = {p: (workdir / "checkpoints" / "40" / p).read_bytes()
              for p in ("state/manifest.ocdbt", COMPLETE_RECORD)}
    # 32 KiB holds the logs and small files; the step's state (~115 KiB here) does not fit.
    out = cli(str(pathlib.Path(__file__).with_name("fsize_limited_train.py")), "32768",
              "--verbosity=-1",
              *tiny_argv(text, workdir, "--num_train_steps=60"), timeout=240)
    # Orbax's tracebacks go to the workdir's log, named in the one error line.
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == lifecycle.EXIT_FAILED, out.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last_line = errors[0]
    # Which file passes the limit first varies: the step's checkpoint or the best-params copy.
    assert re.match(r"error: saving checkpoint step 60 in \S+/(checkpoints|best) failed",
                    last_line), last_line
    assert "(File too large, errno 27)" in last_line
    assert "the newest complete checkpoint (step 40) is intact" in last_line
    assert not (workdir / "checkpoints" / "60" / COMPLETE_RECORD).exists()
    assert before == {p: (workdir / "checkpoints" / "40" / p).read_bytes() for p in before}
    restored = load_trained_run(str(workdir))
    assert restored.step == 40
    jax.tree.map(np.testing.assert_array_equal, restored.params,
                 load_trained_run(str(original)).params)


def test_advice_never_asks_to_lower_what_is_already_at_its_least(finished, tmp_path):
    text, _ = finished
    with pytest.raises(UsageError) as info:
        run(tiny_argv(text, tmp_path / "run", "--eval_batch_size=1", "--split=0.9998,0.0001,"
                      "0.0001"))
    assert "too few for --eval_batch_size=1" in str(info.value)
    assert "lower --eval_batch_size" not in str(info.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match=r"corpus 'file:' names no file; give its path"):
        run(tiny_argv(text, tmp_path / "run", "--corpus=file:"))  # was "cannot read ."

