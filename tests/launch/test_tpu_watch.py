"""What the TPU launcher does over time, on fake workers that run its scripts.

The fake gcloud (fake_gcloud.py) runs each `tpu-vm ssh --worker=all` command with bash on fake
workers (a HOME each), whose `python` acts out what a test asks of each attempt of a run
(fake_train.py: finish, crash, bad input, preempted, hang). So the lock, the exit status, the
probe, the stop and the log copies are the real scripts, run for real.
"""

import json
import os
import time

import pytest

from launch import gcloud, tpu

SMALL = "deeprnn-tiny-small"


def tpu_main(command, sweep_path, *extra):
    return tpu.main([command, f"--sweep={sweep_path}", "--bucket=gs://bkt/sweeps",
                     "--zone=us-central2-b", "--retry_s=0", "--poll_s=0.1", "--log_copy_s=0.1",
                     "--max_polls=200", *extra])


def wait_for(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def failure_record(fake, run):
    return json.loads(fake.gcs(f"gs://bkt/sweeps/tiny/{run}/{tpu.FAILED_FILE}").read_text())


@pytest.fixture
def sweep(tpu_sweep, fake_gcloud):
    fake_gcloud.workers(1)
    return tpu_sweep[0]


def test_a_run_that_keeps_dying_is_restarted_then_failed_and_its_tpu_deleted(
        sweep, fake_gcloud, capsys):
    fake_gcloud.behave("small", "crash")
    tpu_main("up", sweep)
    assert tpu_main("watch", sweep, "--max_restarts=2") == 1  # one run failed
    out = capsys.readouterr().out
    log = fake_gcloud.worker_file(SMALL, 0, "small.log").read_text()
    assert log.count("RuntimeError: boom") == 3  # started, then restarted twice
    assert "small: died (exit status 1); starting it again (restart 2 of 2)" in out
    assert failure_record(fake_gcloud, "small") == {
        "reason": "died (exit status 1), after 2 restarts", "restarts": 2}
    # The other run finished (its evaluation too) and both TPUs are gone: nothing is billed.
    assert fake_gcloud.gcs("gs://bkt/sweeps/tiny/deep/eval/war_and_peace-test.json").exists()
    assert fake_gcloud.tpus() == set()
    assert "# every run ended: 1 finished, 1 failed: small" in out
    # A failed run stays failed: `run` leaves it, `status` says why.
    tpu_main("up", sweep, "--runs=small")
    tpu_main("run", sweep, "--runs=small")
    tpu_main("status", sweep, "--runs=small")
    assert "small: finished or failed, not started" in capsys.readouterr().out


def test_bad_input_fails_at_once_with_its_error_line(sweep, fake_gcloud):
    fake_gcloud.behave("small", "bad")
    tpu_main("up", sweep, "--runs=small")
    assert tpu_main("watch", sweep, "--runs=small", "--max_restarts=3") == 1
    assert failure_record(fake_gcloud, "small") == {
        "reason": "error: --lr must be a positive number, got -1.0; the book uses 2",
        "restarts": 0}
    assert fake_gcloud.worker_file(SMALL, 0, "small.log").read_text().count("error:") == 1


def test_a_stalled_run_is_stopped_and_started_again(sweep, fake_gcloud, capsys):
    fake_gcloud.behave("small", "hang", "ok")
    tpu_main("up", sweep, "--runs=small")
    assert tpu_main("watch", sweep, "--runs=small", "--stall_s=1", "--keep_tpus") == 0
    assert "small: no new step in summary.json for 1s (at step 3); stopping it" in (
        capsys.readouterr().out)
    hung = int((fake_gcloud.state_dir / "hung-small").read_text())
    with pytest.raises(ProcessLookupError):  # the stop ended it
        os.kill(hung, 0)
    assert fake_gcloud.tpus() == {SMALL}  # --keep_tpus


def test_a_run_stopped_by_a_signal_resumes_without_counting_a_restart(sweep, fake_gcloud):
    fake_gcloud.behave("small", "preempted", "preempted", "ok")
    tpu_main("up", sweep, "--runs=small")
    assert tpu_main("watch", sweep, "--runs=small", "--max_restarts=0") == 0
    log = fake_gcloud.worker_file(SMALL, 0, "small.log").read_text()
    assert log.count("stopped by SIGTERM") == 2 and "training finished" in log


def test_a_second_up_and_a_second_down_are_done_not_errors(sweep, fake_gcloud, capsys):
    assert tpu_main("up", sweep) == 0
    assert tpu_main("up", sweep) == 0
    assert capsys.readouterr().out.count("exists already") == 2
    assert tpu_main("down", sweep) == 0
    assert tpu_main("down", sweep) == 0


def test_passing_failures_are_retried_and_lasting_ones_stop_only_their_run(
        sweep, fake_gcloud, capsys):
    fake_gcloud.fail("create", 1, "ERROR: (gcloud.compute.tpus.queued-resources.create) "
                                  "UNAVAILABLE: The service is currently unavailable.")
    assert tpu_main("up", sweep) == 0
    # A VM that is ACTIVE but not yet accepting ssh connections.
    fake_gcloud.fail("ssh", 255, "ssh: connect to host 10.0.0.2 port 22: Connection refused",
                     times=2, match=SMALL)
    fake_gcloud.fail("ssh", 1, "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) PERMISSION_DENIED: "
                               "The caller does not have permission", times=1,
                     match="deeprnn-tiny-deep")
    assert tpu_main("run", sweep) == 1
    captured = capsys.readouterr()
    assert "error: deep: gcloud compute tpus tpu-vm ssh deeprnn-tiny-deep" in captured.err
    assert captured.err.count("Connection refused (exit 255); again in 0s") == 2
    ssh = [c for c in fake_gcloud.calls() if c[3:4] == ["ssh"]]
    assert [c[4] for c in ssh] == [SMALL] * 4 + ["deeprnn-tiny-deep"]  # 2 failed, install, start
    wait_for(lambda: fake_gcloud.gcs("gs://bkt/sweeps/tiny/small/summary.json").exists())


def test_watch_goes_on_with_the_other_runs_while_one_run_cannot_be_reached(
        sweep, fake_gcloud, capsys):
    tpu_main("up", sweep)
    fake_gcloud.fail("describe", 1, "ERROR: (gcloud.compute.tpus.queued-resources.describe) "
                                    "PERMISSION_DENIED: tpu.nodes.get denied", times=3,
                     match=SMALL)
    assert tpu_main("watch", sweep) == 0
    out = capsys.readouterr().out
    assert out.count("# small: gcloud compute tpus queued-resources describe") == 3
    assert "again at the next poll" in out and "# every run ended: 2 finished, 0 failed" in out


def test_each_workers_log_reaches_the_workdir_as_the_run_goes_and_at_its_end(
        sweep, fake_gcloud):
    fake_gcloud.workers(2)  # a pod slice: each worker its own log
    fake_gcloud.behave("small", "slow")
    tpu_main("up", sweep, "--runs=small")
    started = time.monotonic()
    assert tpu_main("run", sweep, "--runs=small") == 0
    assert time.monotonic() - started < 10  # ssh returns once the run is started, not ended
    logs = [fake_gcloud.gcs(f"gs://bkt/sweeps/tiny/small/logs/{SMALL}-w-{i}.log")
            for i in range(2)]
    wait_for(lambda: all(log.exists() and "step 3" in log.read_text() for log in logs))
    assert all("training finished" not in log.read_text() for log in logs)  # still running
    fake_gcloud.release("small")
    exits = [fake_gcloud.worker_file(SMALL, i, "small.exit") for i in range(2)]
    wait_for(lambda: all(e.exists() for e in exits))
    for log in logs:  # the copy made at the end holds the whole log
        wait_for(lambda log=log: "training finished" in log.read_text())


@pytest.mark.parametrize("code,stderr,ssh,kind", [
    (1, "ERROR: (gcloud.x) ALREADY_EXISTS: Resource 'n' already exists", False, "already_exists"),
    (1, "ERROR: (gcloud.x) NOT_FOUND: Resource 'n' was not found", False, "not_found"),
    (1, "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:", False,
     "not_found"),
    (1, "ERROR: (gcloud.x) UNAVAILABLE: try later", False, "transient"),
    (1, "ERROR: (gcloud.x) FAILED_PRECONDITION: the queued resource is SUSPENDING", False,
     "transient"),
    (255, "ssh: connect to host 10.1.2.3 port 22: Connection timed out", True, "transient"),
    (255, "", True, "transient"),
    (1, "ERROR: (gcloud.x) PERMISSION_DENIED: denied", False, "fatal"),
    (2, "ERROR: (gcloud.x) unrecognized arguments: --internal-ips=x", False, "fatal"),
])
def test_gcloud_failures_are_sorted_into_done_transient_and_fatal(code, stderr, ssh, kind):
    assert gcloud.failure_kind(code, stderr, ssh=ssh) == kind
