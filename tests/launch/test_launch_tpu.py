"""The TPU launcher's commands against a fake gcloud (tests/launch/fake_gcloud.py, placed first
on PATH): the gcloud calls each subcommand makes, and the scripts it sends to the workers.
What `watch` does over time, on fake workers that run those scripts, is test_tpu_watch.py.
"""

import os
import re
import shlex
import subprocess
import tarfile

import pytest

from deeprnn.errors import UsageError
from launch import sweep as sweeps
from launch import tpu, workers
from tests.launch.conftest import TPU_FLAGFILE


def tpu_main(command, sweep_path, *extra):
    return tpu.main([command, f"--sweep={sweep_path}", "--bucket=gs://bkt/sweeps",
                     "--project=proj", "--zone=us-central2-b", "--spot", *extra])


def test_tpu_up_run_status_down_against_fake_gcloud(tpu_sweep, fake_gcloud, capsys):
    calls = fake_gcloud.calls
    sweep_path, flagfile = tpu_sweep
    tpu_main("up", sweep_path)
    assert calls() == [
        ["compute", "tpus", "queued-resources", "create", f"deeprnn-tiny-{run}",
         f"--node-id=deeprnn-tiny-{run}", "--zone=us-central2-b", "--project=proj",
         "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base",
         f"--scopes={tpu.CLOUD_PLATFORM_SCOPE}", "--spot"]
        for run in ("small", "deep")]

    tpu_main("run", sweep_path, "--", "--num_train_steps=9")
    run_calls = calls()[2:]
    verbs = [" ".join(c[:4] if c[0] == "compute" else c[:2]) for c in run_calls]
    # Per run: its TPU's state, summary.json, no launch_failed.json, the code, install, start.
    assert verbs == 2 * ["compute tpus queued-resources describe", "storage cat", "storage cat",
                         "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                         "compute tpus tpu-vm ssh"]
    with tarfile.open(run_calls[3][4]) as tar:  # the working tree travels to the workers
        assert {"launch/tpu.py", "deeprnn/report.py"} <= set(tar.getnames())
    install, start = run_calls[10][-1], run_calls[11][-1]
    assert install.startswith("--command=set -e;") and "-e \".[tpu,gcs]\"" in install
    assert "flock -n" in start and ">> ~/deeprnn-runs/deep.log" in start
    # The remote script: train with the flagfile and a gs:// workdir, then the other corpus.
    inner = shlex.split(start.split("bash -c ", 1)[1])[0].split("; ")
    assert inner[inner.index("set -o pipefail") + 1] == (
        f"$HOME/venv/bin/python -m deeprnn.train --flagfile={flagfile} "
        "--workdir=gs://bkt/sweeps/tiny/deep --cell=lstm --num_layers=3 --num_train_steps=9 "
        "--multihost && "
        "$HOME/venv/bin/python -m deeprnn.evaluate --workdir=gs://bkt/sweeps/tiny/deep "
        "--corpus=war_and_peace --split=test --multihost "
        "--output=gs://bkt/sweeps/tiny/deep/eval/war_and_peace-test.json")
    assert "tensorboard --logdir=gs://bkt/sweeps/tiny" in capsys.readouterr().out

    tpu_main("status", sweep_path)
    out = capsys.readouterr().out
    assert "deeprnn-tiny-small" in out and "ACTIVE" in out and "0/? steps" in out

    before = len(calls())
    tpu_main("down", sweep_path)
    assert calls()[before:] == [
        ["compute", "tpus", "queued-resources", "delete", f"deeprnn-tiny-{run}",
         "--zone=us-central2-b", "--project=proj", "--force", "--quiet"]
        for run in ("small", "deep")]


def test_tpu_requeue_recreates_a_preempted_spot_tpu_and_run_restarts_it(
        tpu_sweep, fake_gcloud, capsys):
    calls, preempt = fake_gcloud.calls, fake_gcloud.preempt
    sweep_path, _ = tpu_sweep
    tpu_main("up", sweep_path)
    preempt("deeprnn-tiny-deep")
    before = len(calls())
    tpu_main("requeue", sweep_path)
    requeue_calls = [c[:5] for c in calls()[before:]]
    assert requeue_calls == [
        ["compute", "tpus", "queued-resources", "describe", "deeprnn-tiny-small"],
        ["compute", "tpus", "queued-resources", "describe", "deeprnn-tiny-deep"],
        ["storage", "cat", "gs://bkt/sweeps/tiny/deep/summary.json"],
        ["storage", "cat", "gs://bkt/sweeps/tiny/deep/launch_failed.json"],
        ["compute", "tpus", "queued-resources", "delete", "deeprnn-tiny-deep"],
        ["compute", "tpus", "queued-resources", "create", "deeprnn-tiny-deep"],
    ]
    assert "deep: TPU SUSPENDED, queued again" in capsys.readouterr().out
    # The new TPU is ACTIVE: `run` installs again and restarts the run on its gs:// workdir.
    before = len(calls())
    tpu_main("run", sweep_path, "--runs=deep")
    assert [c[3] for c in calls()[before:] if c[0] == "compute"] == [
        "describe", "scp", "ssh", "ssh"]


def test_tpu_watch_requeues_and_starts_each_run_once_per_tpu(tpu_sweep, fake_gcloud):
    calls, preempt = fake_gcloud.calls, fake_gcloud.preempt
    sweep_path, _ = tpu_sweep
    tpu_main("up", sweep_path, "--runs=deep")
    preempt("deeprnn-tiny-deep")
    tpu_main("watch", sweep_path, "--runs=deep", "--poll_s=0", "--max_polls=3")
    verbs = [c[3] for c in calls() if c[0] == "compute"]
    # Three polls, one preemption: created twice, started once (on the re-created TPU).
    assert verbs.count("create") == 2 and verbs.count("delete") == 1
    starts = [c for c in calls()
              if c[0] == "compute" and c[3] == "ssh" and "deeprnn.train" in c[-1]]
    assert len(starts) == 1


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_gcloud, capsys):
    calls = fake_gcloud.calls
    tpu.main(["up", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--no_queue",
              "--dry_run", "--runs=lstm_l2"])
    assert capsys.readouterr().out.splitlines() == [
        "gcloud compute tpus tpu-vm create deeprnn-depth-cell-lstm-l2 --zone=z "
        "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base "
        "--scopes=https://www.googleapis.com/auth/cloud-platform"]
    tpu.main(["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--repo_url=https://example.com/deeprnn.git", "--ref=abc123"])
    lines = capsys.readouterr().out.splitlines()
    assert sum("deeprnn.train --flagfile=experiments/time_machine_lstm.flags" in line
               for line in lines) == 9
    assert sum("git clone -q https://example.com/deeprnn.git" in line for line in lines) == 9
    # Each step its own command under `set -e`, so a failed fetch stops the install.
    assert sum("; git fetch -q origin abc123; git checkout -q --force --detach FETCH_HEAD; "
               in line for line in lines) == 9
    assert "--workdir=gs://bkt/depth_cell/gru_l4 --corpus=time_machine --cell=gru " \
           "--num_layers=4" in "\n".join(lines)
    assert calls() == []


@pytest.mark.parametrize("accelerator,image", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_runtime_version_follows_the_accelerator_type(accelerator, image, capsys):
    tpu.main(["up", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2", f"--accelerator_type={accelerator}"])
    assert f"--accelerator-type={accelerator} --runtime-version={image}" in capsys.readouterr().out
    tpu.main(["up", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2", f"--accelerator_type={accelerator}", "--runtime_version=mine"])
    assert "--runtime-version=mine" in capsys.readouterr().out  # given: used as is


@pytest.mark.parametrize("queue", [[], ["--no_queue"]])
def test_a_service_account_and_the_cloud_platform_scope_reach_the_tpu(queue, capsys):
    tpu.main(["up", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2", "--service_account=runs@proj.iam.gserviceaccount.com", *queue])
    create = shlex.split(capsys.readouterr().out)
    assert "--service-account=runs@proj.iam.gserviceaccount.com" in create
    assert "--scopes=https://www.googleapis.com/auth/cloud-platform" in create


def test_an_unknown_accelerator_type_asks_for_a_runtime_version():
    with pytest.raises(UsageError, match="no known TPU software version for "
                                         "--accelerator_type=v9x-8.*give --runtime_version"):
        tpu.main(["up", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
                  "--accelerator_type=v9x-8"])


def remote_commands(dry_run_output: str) -> list[str]:
    """The --command of every `tpu-vm ssh` a dry run printed."""
    return [arg.removeprefix("--command=") for line in dry_run_output.splitlines()
            if " tpu-vm ssh " in line for arg in shlex.split(line)
            if arg.startswith("--command=")]


@pytest.mark.parametrize("venv_python,made_again", [("3.11", True), ("3.12", False)])
def test_workers_get_python_3_12_and_a_venv_of_another_python_is_made_again(
        tmp_path, capsys, venv_python, made_again):
    tpu.main(["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2"])
    install = remote_commands(capsys.readouterr().out)[0]
    step = next(s for s in install.split("; ") if "uv venv" in s)
    assert step.endswith("uv venv -q --clear --python 3.12 $HOME/venv")
    # The step itself, on a worker whose venv holds Python `venv_python`.
    (tmp_path / "venv/bin").mkdir(parents=True)
    (tmp_path / ".local/bin").mkdir(parents=True)
    for path, body in ((tmp_path / "venv/bin/python", f"echo Python {venv_python}.7"),
                       (tmp_path / ".local/bin/uv", f'echo "$@" > {tmp_path}/uv_args')):
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    subprocess.run(["bash", "-c", step], env={**os.environ, "HOME": str(tmp_path)}, check=True)
    assert (tmp_path / "uv_args").exists() == made_again


def test_runs_that_would_share_a_tpu_name_are_refused(tmp_path):
    path = tmp_path / "names.py"
    path.write_text(f"BASE_FLAGFILE = {TPU_FLAGFILE!r}\ndef runs():\n    yield 'a_b', {{}}\n"
                    "    yield 'A.B', {}\n")
    with pytest.raises(UsageError, match="runs a_b and A.B would share the TPU name "
                                         "deeprnn-names-a-b"):
        tpu.main(["up", f"--sweep={path}", "--bucket=gs://bkt", "--zone=z", "--dry_run"])


def test_a_missing_gcloud_is_a_usage_error(tpu_sweep, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UsageError, match="gcloud is not on PATH"):
        tpu.main(["status", f"--sweep={tpu_sweep[0]}", "--bucket=gs://bkt", "--zone=z"])


def test_tpu_bad_bucket_is_a_usage_error(tpu_sweep):
    with pytest.raises(UsageError, match="gs://"):
        tpu.main(["up", f"--sweep={tpu_sweep[0]}", "--bucket=/local", "--zone=z"])


def test_launch_readme_names_every_tpu_command():
    readme = (sweeps.REPO_ROOT / "launch" / "README.md").read_text()
    for command in tpu.COMMANDS:
        assert f"python -m launch.tpu {command}" in readme, command
    assert "python -m launch.local" in readme


def test_a_local_data_dir_is_refused_and_a_gs_one_reaches_every_run(capsys):
    common = ["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2"]
    with pytest.raises(UsageError, match="--data_dir=../shared/corpora is a folder on this "
                                         "machine, which the TPU workers cannot read"):
        tpu.main([*common, "--data_dir=../shared/corpora"])
    tpu.main([*common, "--data_dir=gs://bkt/corpora"])
    assert "--data_dir=gs://bkt/corpora" in remote_commands(capsys.readouterr().out)[-1]


@pytest.mark.parametrize("flag, message", [
    ("--gcloud_retries=-1", "not an integer in the range"),
    ("--retry_s=-1", "must be a finite number of seconds, 0 or more"),
    ("--poll_s=-1", "must be a finite number of seconds, 0 or more"),
    ("--poll_s=1e300", "at most 86400"),
    ("--log_copy_s=0", "more than 0"),
    ("--log_copy_s=-5", "more than 0"),
    ("--log_copy_s=nan", "more than 0"),
    ("--max_polls=0", "not a positive integer"),
    ("--max_restarts=-1", "not a non-negative integer"),
    ("--stall_s=nan", "more than 0"),
])
def test_numeric_flags_out_of_range_are_refused_while_parsing(flag, message, fake_gcloud, capsys):
    with pytest.raises(UsageError, match=f"^flag {flag.split('=')[0]}=.*{message}"):
        tpu.main(["watch", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
                  flag])
    assert capsys.readouterr().out == "" and fake_gcloud.calls() == []


@pytest.mark.parametrize("version", ["3.12.4", "3.12; touch ~/x", "3", "python3.12", "3.12\n"])
def test_a_python_version_other_than_x_y_is_refused(version, capsys):
    with pytest.raises(UsageError, match="must be a Python version X.Y such as 3.12"):
        tpu.main(["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
                  "--runs=lstm_l2", f"--python_version={version}"])
    assert capsys.readouterr().out == ""
    tpu.main(["run", "--sweep=depth_cell", "--bucket=gs://bkt", "--zone=z", "--dry_run",
              "--runs=lstm_l2", "--python_version=3.13"])
    assert "grep -qF 'Python 3.13.'" in remote_commands(capsys.readouterr().out)[0]


def test_the_flagfile_must_exist_in_the_repository_before_any_gcloud_call(
        tpu_sweep, tiny_sweep, fake_gcloud, monkeypatch, capsys):
    path, _ = tpu_sweep
    common = ["--bucket=gs://bkt", "--zone=z", "--runs=small"]
    for command in ("up", "run", "requeue", "watch"):
        for dry_run in ([], ["--dry_run"]):
            path.write_text(TPU_SWEEP_BODY.format(flagfile="experiments/missing.flags"))
            with pytest.raises(UsageError, match="flagfile experiments/missing.flags does not "
                                                 "exist"):
                tpu.main([command, f"--sweep={path}", *common, *dry_run])
            # tests/conftest.py's tiny sweep: a flagfile that exists, outside the repository.
            with pytest.raises(UsageError, match="lies outside the repository .* move it into "
                                                 "the repository"):
                tpu.main([command, f"--sweep={tiny_sweep[0]}", *common, *dry_run])
    assert fake_gcloud.calls() == [] and capsys.readouterr().out == ""
    # status and down need no flagfile: a sweep whose flagfile is gone can still be torn down.
    assert tpu.main(["down", f"--sweep={path}", *common]) == 0
    # Given by its absolute path in the repository: the workers read it from their copy.
    path.write_text(TPU_SWEEP_BODY.format(flagfile=str(sweeps.REPO_ROOT / TPU_FLAGFILE)))
    tpu.main(["run", f"--sweep={path}", *common, "--dry_run"])
    assert f"deeprnn.train --flagfile={TPU_FLAGFILE} " in remote_commands(
        capsys.readouterr().out)[-1]
    # One that git ignores is not in the copy of this tree the workers get; a clone: not known.
    monkeypatch.setattr(workers, "source_files", lambda: [])
    with pytest.raises(UsageError, match="is ignored by git"):
        tpu.main(["run", f"--sweep={path}", *common, "--dry_run"])
    tpu.main(["run", f"--sweep={path}", *common, "--dry_run", "--repo_url=https://x/y.git"])


TPU_SWEEP_BODY = "BASE_FLAGFILE = {flagfile!r}\ndef runs():\n    yield 'small', {{}}\n"


@pytest.mark.parametrize("name", ["a/b", "..", "../up", ".hidden", "a\n"])
def test_a_sweep_name_that_is_no_plain_folder_name_is_refused(name, tmp_path, capsys):
    common = ["up", "--bucket=gs://bkt", "--zone=z", "--dry_run", "--runs=lstm_l2"]
    with pytest.raises(UsageError, match="(?s)^flag --sweep_name=.*must be letters, digits"):
        tpu.main([*common, "--sweep=depth_cell", f"--sweep_name={name}"])
    sweep_file = tmp_path / "my sweep.py"  # the sweep's name, unless --sweep_name is given
    sweep_file.write_text((sweeps.SWEEPS_DIR / "depth_cell.py").read_text())
    with pytest.raises(UsageError, match="sweep name 'my sweep', from its file name, must be"):
        tpu.main([*common, f"--sweep={sweep_file}"])
    tpu.main([*common, f"--sweep={sweep_file}", "--sweep_name=my_sweep"])
    assert capsys.readouterr().out.startswith(
        "gcloud compute tpus queued-resources create deeprnn-my-sweep-lstm-l2 ")


@pytest.mark.parametrize("flag", [
    "--bucket=gs://", "--bucket=gs:///x", "--bucket=gs://Upper", "--bucket=gs://ab",
    "--bucket=gs://-bkt", "--bucket=gs://bkt//x", "--bucket=gs://bkt/../x", "--bucket=gs://bkt/a*",
    "--name_prefix=1abc", "--name_prefix=", "--accelerator_type=v4",
    "--accelerator_type=v4-abc", "--accelerator_type=v4-0", "--accelerator_type=V4-8"])
def test_buckets_tpu_name_prefixes_and_accelerator_types_gcloud_would_refuse(flag, capsys):
    with pytest.raises(UsageError, match=f"^flag {re.escape(flag)}: must"):
        tpu.main(["up", "--sweep=depth_cell", "--zone=z", "--dry_run", "--runs=lstm_l2",
                  *(["--bucket=gs://bkt"] if "bucket" not in flag else []), flag])
    assert capsys.readouterr().out == ""


def test_a_gs_data_dir_is_checked_like_the_bucket_and_good_names_pass(capsys):
    common = ["up", "--sweep=depth_cell", "--zone=z", "--dry_run", "--runs=lstm_l2"]
    with pytest.raises(UsageError, match="^--data_dir=gs:// must be gs://BUCKET"):
        tpu.main([*common, "--bucket=gs://bkt", "--data_dir=gs://"])
    tpu.main([*common, "--bucket=gs://my.bucket_1/a/b/", "--name_prefix=Runs_2",
              "--accelerator_type=v5litepod-16", "--data_dir=gs://bkt/corpora"])
    assert "create runs-2-depth-cell-lstm-l2 " in capsys.readouterr().out
