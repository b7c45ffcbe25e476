"""Command lines that used to end in a traceback or the wrong status: every spelling of help,
a flagfile that is not text, the multi-host flags, integers too large for int64, and output
paths that cannot be written. In-process where the parsing allows; the few subprocesses are
refused before JAX loads, but for --multihost alone, which only JAX can judge."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deeprnn.config import parse_args
from deeprnn.errors import UsageError, help_form, parse_argv
from deeprnn.run import lifecycle
from deeprnn.run.outputs import check_output_file
from tests.helpers import REPO
from tests.programs.test_failures import without_dac_override


def cli(*args, timeout=120):
    # cwd=REPO: `python -m` imports this checkout's deeprnn, not another editable install.
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_the_programs_run_this_checkouts_package():
    """The subprocesses below test this checkout only if `python -m` finds its deeprnn first
    (an editable install may point at another checkout)."""
    done = cli("deeprnn.report", "--helpxml")  # the XML names each flag's defining file
    assert done.returncode == 0
    assert f"<file>{REPO / 'deeprnn' / 'report.py'}</file>" in done.stdout


@pytest.mark.parametrize("args, form", [
    (["--help"], "short"), (["-help"], "short"), (["--help=true"], "short"),
    (["-help=T"], "short"), (["-h"], "short"), (["-?"], "short"), (["--helpshort"], "short"),
    (["-helpfull"], "full"), (["--helpfull=1"], "full"), (["--helpxml"], "xml"),
    (["--help=false"], None), (["--nohelp"], None), (["--prefix=--help"], None),
    (["--", "--help"], None), (["--workdir=x", "-helpxml"], "xml"),
])
def test_every_absl_spelling_of_help_is_recognised(args, form):
    """-help, -helpfull, --help=true and --helpxml used to reach absl, which printed the help
    and exited 1 (a failure, to a script)."""
    assert help_form(args) == form


@pytest.mark.parametrize("flag", ["-help", "--help=true", "--helpxml", "-helpfull"])
def test_help_in_process_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as done:
        parse_args([flag])
    assert done.value.code == 0 and "num_hiddens" in capsys.readouterr().out


def test_help_on_the_command_line_and_in_a_flagfile_exits_0(tmp_path):
    for args in (["-help"], ["--help=true"], ["--helpxml"]):
        done = cli("deeprnn.report", *args)
        assert done.returncode == 0 and "sweep_dir" in done.stdout, (args, done.stderr)
    flagfile = tmp_path / "help.flags"
    flagfile.write_text("--helpfull\n")  # absl itself prints this one, and exited 1
    done = cli("deeprnn.report", f"--flagfile={flagfile}")
    assert done.returncode == 0 and "sweep_dir" in done.stdout, done.stderr


def test_a_flagfile_that_is_not_text_is_one_line_naming_it(tmp_path):
    """It was a UnicodeDecodeError traceback, naming no file."""
    binary = tmp_path / "bin.flags"
    binary.write_bytes(b"\xff\xfe\x00--num_layers=2\x80")
    outer = tmp_path / "outer.flags"
    outer.write_text(f"--num_layers=1\n--flagfile={binary}\n")
    message = (rf"flagfile {binary} is not text \(byte 0xff at offset 0 is not utf-8\); a "
               r"flagfile holds --flag=value lines, one a line; see python -m deeprnn.train")
    for flagfile in (binary, outer):  # named on the command line, or inside another flagfile
        with pytest.raises(UsageError, match=message):
            parse_args([f"--flagfile={flagfile}"])
    done = cli("deeprnn.report", f"--flagfile={outer}")  # the programs' parser says the same
    assert done.returncode == lifecycle.EXIT_USAGE
    assert done.stderr.startswith(f"error: flagfile {binary} is not text")
    assert done.stderr.count("\n") == 1, done.stderr


def test_a_help_request_on_a_fresh_flag_set_exits_0(capsys):
    """The benchmark and the launchers parse with parse_argv: -help was an unknown flag."""
    def define(values):
        from absl import flags
        flags.DEFINE_integer("rows", 1, "Rows.", flag_values=values)

    with pytest.raises(SystemExit) as done:
        parse_argv(define, ["-help"], "deeprnn.bench")
    assert done.value.code == 0 and "--rows" in capsys.readouterr().out


def test_multihost_alone_outside_a_cluster_is_one_line_and_creates_nothing(tmp_path):
    """Only JAX can tell whether the environment is a cluster (a Cloud TPU pod slice is);
    outside one it raised `ValueError: coordinator_address should be defined`."""
    workdir = tmp_path / "run"
    done = cli("deeprnn.train", f"--workdir={workdir}", "--multihost", "--notensorboard",
               "--num_train_steps=1")
    assert done.returncode == lifecycle.EXIT_USAGE, done.stderr[-2000:]
    assert done.stderr.endswith("error: --multihost found no cluster in this environment to "
                                "join (JAX says: coordinator_address should be defined.); "
                                "outside Cloud TPU pass --coordinator_address=HOST:PORT "
                                "--num_processes=N --process_id=I\n"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not workdir.exists()


@pytest.mark.parametrize("program, args, message", [
    ("evaluate", ["--multihost", "--coordinator_address=nonsense", "--num_processes=2",
                  "--process_id=1"], "--coordinator_address='nonsense' is not HOST:PORT"),
    ("evaluate", ["--num_processes=3"], "--num_processes=3 applies only with --multihost"),
    ("generate", ["--length=99999999999999999999"],
     "--length=99999999999999999999 is too large; give at most 1000000"),
    ("generate", ["--seed=99999999999999999999", "--temperature=1"],
     "--seed=99999999999999999999 is out of range; give a seed in [0, 4294967295]"),
])
def test_evaluate_and_generate_check_their_flags_first(program, args, message, tmp_path):
    done = cli(f"deeprnn.{program}", f"--workdir={tmp_path}", *args)
    assert done.returncode == lifecycle.EXIT_USAGE
    assert done.stderr == f"error: {message}" + done.stderr.split(message, 1)[1], done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_evaluate_output_is_checked_before_the_scoring(tmp_path):
    """A folder, a parent that is a file or a read-only folder failed after the whole
    evaluation, naming a temporary file (`PATH.tmp-10657: Is a directory`) or the wrong one
    (`File exists`), with no fix."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=rf"--output={tmp_path} is a folder; give a file path"):
        check_output_file(str(tmp_path), "output")
    for path in (blocker / "result.json", blocker / "deeper" / "result.json"):
        with pytest.raises(UsageError, match=rf"--output={path}: {blocker} is a file, not a "
                                             r"folder; give a file path in a folder you can"):
            check_output_file(str(path), "output")
    check_output_file(str(tmp_path / "new" / "folders" / "result.json"), "output")  # made
    check_output_file("gs://bucket/result.json", "output")  # checked by its write, as before
    # The program refuses before loading the run: this workdir holds no run at all.
    done = cli("deeprnn.evaluate", f"--workdir={tmp_path / 'no_run'}", f"--output={tmp_path}")
    assert done.returncode == lifecycle.EXIT_USAGE
    assert done.stderr.startswith(f"error: --output={tmp_path} is a folder"), done.stderr


def test_a_read_only_output_folder_is_named_with_the_fix(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    done = subprocess.run(
        [*without_dac_override(), sys.executable, "-m", "deeprnn.evaluate",
         f"--workdir={tmp_path}", f"--output={read_only}/result.json"],
        capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=120)
    assert done.returncode == lifecycle.EXIT_USAGE, done.stderr
    assert done.stderr == (f"error: --output={read_only}/result.json: cannot write in "
                           f"{read_only} (permission denied); give a file path in a folder you "
                           "can write\n")
