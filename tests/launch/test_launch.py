"""The local launcher end to end with fake train and evaluate programs, then with the real
ones; the launchers' command lines (test_launch_tpu.py: the TPU launcher)."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from deeprnn.errors import UsageError
from launch import local
from launch import sweep as sweeps

# ---------------------------------------------------------------- local runner

FAKE_TRAIN = """
import json, os, pathlib, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = pathlib.Path(flags["workdir"])
workdir.mkdir(parents=True, exist_ok=True)
with open(workdir / "calls.txt", "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
if flags.get("cell") == "broken":
    sys.exit(3)
if flags.get("cell") == "stopped":  # as a run stopped by Ctrl-C after its checkpoint
    sys.exit(75)
summary = {"flags": flags, "steps_done": 2, "finished": True,
           "final": {"test/perplexity": 5.0}}
(workdir / "summary.json").write_text(json.dumps(summary))
"""

FAKE_EVALUATE = """
import json, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
print("loading", file=sys.stderr)
if flags["corpus"] == "unreadable":
    print('{"half', flush=True)
    sys.exit(4)
print(json.dumps({"corpus": flags["corpus"], "split": flags["split"], "perplexity": 9.5}))
"""


@pytest.fixture
def fake_programs(tmp_path, monkeypatch):
    modules = tmp_path / "fake_modules"
    modules.mkdir()
    (modules / "fake_train.py").write_text(FAKE_TRAIN)
    (modules / "fake_evaluate.py").write_text(FAKE_EVALUATE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(modules), str(sweeps.REPO_ROOT)]))
    return ["--python", sys.executable, "--train_module=fake_train",
            "--evaluate_module=fake_evaluate"]


def calls_of(workdir):
    return [json.loads(line) for line in (workdir / "calls.txt").read_text().splitlines()]


def test_local_dry_run_prints_the_exact_commands(tiny_sweep, tmp_path, capsys):
    sweep_path, flagfile = tiny_sweep
    sweep_dir, corpora = tmp_path / "runs", tmp_path / "corpora"
    corpora.mkdir()
    assert local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", "--dry_run",
                       "--python=python", f"--data_dir={corpora}", "--parallel_gpus=2",
                       "--", "--num_train_steps=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cd {sweeps.REPO_ROOT}"
    assert [shlex.split(line) for line in lines[1:]] == [
        ["CUDA_VISIBLE_DEVICES=0", "python", "-m", "deeprnn.train", f"--flagfile={flagfile}",
         f"--workdir={sweep_dir}/small", f"--data_dir={corpora}", "--cell=gru", "--num_layers=1",
         "--num_train_steps=7"],
        ["CUDA_VISIBLE_DEVICES=1", "python", "-m", "deeprnn.train", f"--flagfile={flagfile}",
         f"--workdir={sweep_dir}/deep", f"--data_dir={corpora}", "--cell=lstm", "--num_layers=3",
         "--num_train_steps=7"],
        ["CUDA_VISIBLE_DEVICES=1", "python", "-m", "deeprnn.evaluate",
         f"--workdir={sweep_dir}/deep", "--corpus=war_and_peace", "--split=test",
         f"--data_dir={corpora}"],
    ]
    assert not sweep_dir.exists()  # a dry run runs nothing


def test_local_runner_trains_evaluates_and_skips_finished_runs(
        tiny_sweep, tmp_path, fake_programs, capsys):
    sweep_path, flagfile = tiny_sweep
    sweep_dir = tmp_path / "runs"
    argv = [f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs,
            "--extra_flags=--seed=3"]
    assert local.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/2] small: training" in out and "[2/2] deep: evaluation on war_and_peace" in out
    (small_call,) = calls_of(sweep_dir / "small")
    assert small_call["argv"] == [f"--flagfile={flagfile}", f"--workdir={sweep_dir}/small",
                                  "--cell=gru", "--num_layers=1", "--seed=3"]
    assert small_call["cwd"] == str(sweeps.REPO_ROOT)  # where flagfile paths are relative to
    assert small_call["gpus"] is None
    assert json.loads((sweep_dir / "deep/summary.json").read_text())["finished"]
    result = json.loads((sweep_dir / "deep/eval/war_and_peace-test.json").read_text())
    assert result == {"corpus": "war_and_peace", "split": "test", "perplexity": 9.5}
    assert "loading" in (sweep_dir / "deep/eval/war_and_peace-test.log").read_text()
    assert not (sweep_dir / "small/eval").exists()

    # Again: both finished and scored, so nothing runs.
    assert local.main(argv) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    assert len(calls_of(sweep_dir / "small")) == len(calls_of(sweep_dir / "deep")) == 1


def test_local_runner_spreads_runs_over_gpus_and_reports_failures(
        tiny_sweep, tmp_path, fake_programs, capsys):
    sweep_path, _ = tiny_sweep
    sweep_dir = tmp_path / "runs"
    code = local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs,
                       "--parallel_gpus=2", "--runs=small"])
    assert code == 0
    assert calls_of(sweep_dir / "small")[0]["gpus"] in {"0", "1"}
    assert not (sweep_dir / "deep").exists()
    code = local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs,
                       "--runs=deep", "--", "--cell=broken"])
    assert code == 1
    assert "deep: FAILED with exit code 3" in capsys.readouterr().out
    assert local.device_slots(4, 2) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                        {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(UsageError, match="multiple"):
        local.device_slots(3, 2)
    with pytest.raises(UsageError, match="must be 0"):
        local.device_slots(-2, 1)


def test_local_dry_run_reads_data_dir_from_here_and_needs_the_flagfile(
        tiny_sweep, tmp_path, monkeypatch, capsys):
    sweep_path, flagfile = tiny_sweep
    monkeypatch.chdir(tmp_path)  # the runs themselves run in the repository's folder
    (tmp_path / "mirror").mkdir()
    assert local.main([f"--sweep={sweep_path}", "--sweep_dir=runs", "--dry_run",
                       "--data_dir=mirror", "--runs=small"]) == 0
    assert f"--data_dir={tmp_path / 'mirror'} " in capsys.readouterr().out
    flagfile.unlink()
    with pytest.raises(UsageError, match="does not exist"):
        local.main([f"--sweep={sweep_path}", "--sweep_dir=runs", "--dry_run"])


def test_rerun_finished_trains_again_in_a_fresh_folder_and_keeps_the_old_one(
        tiny_sweep, tmp_path, fake_programs, capsys):
    sweep_path, _ = tiny_sweep
    sweep_dir = tmp_path / "runs"
    argv = [f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs, "--runs=small"]
    assert local.main(argv) == 0
    assert local.main([*argv, "--rerun_finished"]) == 0
    assert "small: finished before; moved to" in capsys.readouterr().out
    (moved,) = (sweep_dir / ".replaced").iterdir()
    assert moved.name.startswith("small-") and len(calls_of(moved)) == 1
    assert len(calls_of(sweep_dir / "small")) == 1  # trained from scratch, not resumed
    assert sorted(p.name for p in sweep_dir.glob("*/summary.json")) == ["summary.json"]


def test_a_stopped_run_stops_the_sweep_and_a_missing_program_fails_each_run(
        tiny_sweep, tmp_path, fake_programs, capsys):
    sweep_path, _ = tiny_sweep
    sweep_dir = tmp_path / "runs"
    code = local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs,
                       "--", "--cell=stopped"])
    assert code == 75
    assert "1 runs not started" in capsys.readouterr().out
    assert (sweep_dir / "small").exists() and not (sweep_dir / "deep").exists()
    code = local.main([f"--sweep={sweep_path}", f"--sweep_dir={tmp_path / 'other'}",
                       "--python=/nonexistent/python"])
    out = capsys.readouterr().out
    assert code == 1 and out.count("FAILED: [Errno 2]") == 2 and "2 of 2 runs failed" in out


def test_every_eval_corpus_is_scored_when_one_fails(tmp_path, fake_programs, capsys):
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("--num_train_steps=2\n")
    sweep_path = tmp_path / "evals.py"
    sweep_path.write_text(f"BASE_FLAGFILE = {str(flagfile)!r}\ndef runs():\n    yield 'a', "
                          "{}, {'eval_corpora': ['unreadable', 'war_and_peace']}\n")
    sweep_dir = tmp_path / "runs"
    assert local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}",
                       *fake_programs]) == 1
    assert "evaluation on unreadable FAILED (4)" in capsys.readouterr().out
    assert sorted(p.name for p in (sweep_dir / "a/eval").iterdir()) == [
        "unreadable-test.log", "war_and_peace-test.json", "war_and_peace-test.log"]


@pytest.mark.parametrize("body, message", [
    ("def runs():\n    raise ValueError('TOKEN_BUDGET must be positive')\n",
     "ValueError: TOKEN_BUDGET must be positive; fix the sweep file"),
    ("def runs():\n    yield ('only_a_name',)\n", "run entry ('only_a_name',) must be"),
    ("def runs():\n    yield 'a', {}, {'eval_corpora': 'war_and_peace'}\n",
     "eval_corpora must be a list of corpus specs"),
], ids=["runs_raises", "short_entry", "eval_corpora_string"])
def test_a_broken_sweep_file_is_one_usage_error(tmp_path, body, message):
    path = tmp_path / "broken.py"
    path.write_text("BASE_FLAGFILE = 'x.flags'\n" + body)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sweeps.load_sweep(str(path))


def test_a_seed_given_twice_is_refused(tiny_sweep):
    sweep = sweeps.load_sweep(str(tiny_sweep[0]))
    with pytest.raises(UsageError, match="names a seed twice"):
        sweeps.select_runs(sweep, seeds="0,0")


@pytest.mark.parametrize("module", ["launch.local", "launch.tpu"])
def test_command_line_turns_bad_input_into_one_error_line(module, tmp_path):
    argv = [sys.executable, "-m", module, "--sweep=nope", f"--sweep_dir={tmp_path}"]
    if module == "launch.tpu":
        argv = [sys.executable, "-m", module, "up", "--sweep=nope", "--bucket=gs://bkt", "--zone=z"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(sweeps.REPO_ROOT)})
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown sweep 'nope'; pick one of corpora, depth_cell")


@pytest.mark.slow
def test_local_runner_with_the_real_programs_then_the_report(tmp_path, capsys):
    """Two tiny runs of `python -m deeprnn.train`, one scored by `deeprnn.evaluate` on a text
    by another "author", then `deeprnn.report` over the sweep folder."""
    from deeprnn.run.sweep_results import write_report
    from tests.helpers import INFO_LOG_LINE, write_text

    text = write_text(tmp_path / "tiny.txt")
    other = tmp_path / "other.txt"
    other.write_text("the machine and the fire of the room " * 40)
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text("\n".join([
        f"--corpus=file:{text}", "--batch_size=8", "--num_steps=8", "--num_hiddens=8",
        "--num_train_steps=6", "--log_every=3", "--eval_every=3", "--checkpoint_every=3",
        "--eval_batch_size=2", "--optimizer=adam", "--lr=0.01", "--sample_length=5"]))
    sweep = tmp_path / "two.py"
    sweep.write_text(f"BASE_FLAGFILE = {str(flagfile)!r}\n\ndef runs():\n"
                     "    yield 'rnn_l1', {'cell': 'rnn', 'num_layers': 1}\n"
                     "    yield 'gru_l2', {'cell': 'gru', 'num_layers': 2}, "
                     f"{{'eval_corpora': ['file:{other}']}}\n")
    sweep_dir = tmp_path / "runs"
    assert local.main([f"--sweep={sweep}", f"--sweep_dir={sweep_dir}",
                       f"--python={sys.executable}"]) == 0
    for run in ("rnn_l1", "gru_l2"):
        summary = json.loads((sweep_dir / run / "summary.json").read_text())
        assert summary["finished"] and summary["steps_done"] == 6
        log = (sweep_dir / run / "train.log").read_text()
        assert "perplexity" in log and not INFO_LOG_LINE.search(log), log[:300]
    scored = json.loads(next((sweep_dir / "gru_l2" / "eval").glob("*.json")).read_text())
    assert scored["split"] == "test" and scored["perplexity"] > 1
    report = write_report(str(sweep_dir), str(tmp_path / "report"))
    assert "| rnn_l1 | rnn | 1 |" in report and "| gru_l2 | gru | 2 |" in report
    assert (tmp_path / "report" / "validation_perplexity.png").read_bytes()[:4] == b"\x89PNG"



def test_a_sweep_dir_that_is_a_file_and_a_missing_data_dir_are_refused_up_front(
        tiny_sweep, tmp_path, fake_programs, capsys):
    sweep_path, _ = tiny_sweep
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for sweep_dir in (a_file, a_file / "runs"):
        for dry_run in ([], ["--dry_run"]):
            with pytest.raises(UsageError, match=f"{a_file} is a file, not a folder"):
                local.main([f"--sweep={sweep_path}", f"--sweep_dir={sweep_dir}", *fake_programs,
                            *dry_run])
    with pytest.raises(UsageError, match="--data_dir=.*/nowhere is not a folder"):
        local.main([f"--sweep={sweep_path}", f"--sweep_dir={tmp_path / 'runs'}",
                    f"--data_dir={tmp_path / 'nowhere'}", *fake_programs])
    assert capsys.readouterr().out == "" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("launcher", ["local", "tpu"])
@pytest.mark.parametrize("extra, seeds, message", [
    (["--extra_flags=--workdir=/tmp/elsewhere"], [], "train flag --workdir=/tmp/elsewhere"),
    (["--", "--workdir", "/tmp/elsewhere"], [], "train flag --workdir .*undo"),
    (["--", "-workdir=/tmp/elsewhere"], [], "would undo the launcher's --workdir"),
    (["--extra_flags=--seed=3"], ["--seeds=0,1"], "every run of --seeds=0,1 that one seed"),
    (["--", "--seed=3"], ["--seeds=0,1"], "every run of --seeds=0,1 that one seed"),
], ids=["workdir_extra_flags", "workdir_after_dashes", "workdir_one_dash", "seed_extra_flags",
        "seed_after_dashes"])
def test_extra_flags_may_not_undo_the_launchers_workdir_or_seeds(
        launcher, extra, seeds, message, tmp_path, capsys):
    from launch import tpu

    argv = {"local": ["--sweep=depth_cell", f"--sweep_dir={tmp_path / 'runs'}", "--dry_run"],
            "tpu": ["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run"]}
    main = {"local": local.main, "tpu": tpu.main}[launcher]
    with pytest.raises(UsageError, match=message):
        main([*argv[launcher], *seeds, *extra])  # a bare -- comes last
    assert capsys.readouterr().out == ""
    main([*argv[launcher], "--runs=lstm_l2", "--extra_flags=--seed=3"])  # without --seeds: fine
    assert "--seed=3" in capsys.readouterr().out


def test_zero_gpus_per_run_is_refused_by_name():
    with pytest.raises(UsageError, match=r"^--gpus_per_run=0 must be at least 1"):
        local.device_slots(4, 0)


@pytest.mark.parametrize("launcher, usage", [
    ("tpu", "usage: python -m launch.tpu {up|run|status|requeue|watch|down} --sweep="),
    ("local", "usage: python -m launch.local --sweep=NAME|PATH.py --sweep_dir=DIR "),
])
def test_help_names_what_each_launcher_requires(launcher, usage, capsys):
    from launch import tpu

    with pytest.raises(SystemExit) as exit_:
        {"local": local.main, "tpu": tpu.main}[launcher](["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(usage) and "--sweep:" in out
