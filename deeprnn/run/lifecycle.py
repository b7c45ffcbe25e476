"""How a run starts and stops: the workdir lock, stop signals and preemption, exit statuses.

Exit statuses of `python -m deeprnn.train`:

    0   finished.
    1   failed for a reason outside the flags (RunFailed, OSError): a checkpoint or log could
        not be written (disk full, file-size limit, I/O error). The newest complete checkpoint
        is intact; fix the cause and run the same command again to resume.
    2   bad input (UsageError): flags, corpus, workdir, checkpoint, a non-finite loss. Nothing
        in the workdir was written over.
    75  stopped early by SIGTERM or SIGINT (a preemption notice, Ctrl-C) after finishing the
        current step and saving a checkpoint of it: run the same command again to resume.
    130 a second Ctrl-C stopped it at once (the newest complete checkpoint is intact).
        75 is EX_TEMPFAIL of sysexits.h, "a temporary failure: try again later", so a
        launcher can tell "resume me" from a failure and from a kill by a signal (128 + n).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading

from etils import epath

from deeprnn.config import check_reachable
from deeprnn.errors import EXIT_USAGE, UsageError  # noqa: F401 (EXIT_USAGE re-exported)

EXIT_FAILED = 1
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process Ctrl-C ended

LOCK_FILE = "deeprnn.lock"
CRASH_ENV = "DEEPRNN_TEST_CRASH_AT"


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint of its last finished step."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, signal_name: str):
        self.step = step
        super().__init__(f"stopped by {signal_name} after step {step} (checkpoint of step "
                         f"{step} saved); run the same command again to resume")


class RunFailed(Exception):
    """An expected failure outside the user's input (a write that failed): one line."""

    exit_code = EXIT_FAILED


def interrupted(err: BaseException) -> bool:
    """True when a KeyboardInterrupt (a second Ctrl-C) caused this failure, somewhere down
    its chain: a save it cut short is not a full disk."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def check_workdir_location(workdir: str, flag: str = "workdir") -> None:
    """A local folder, or gs:// with gcsfs installed (config.check_reachable)."""
    check_reachable(workdir, flag)


def describe_os_error(err: OSError, step: int | None = None) -> str:
    """One line for an OSError met while writing the workdir (disk full, read-only, ...)."""
    where = f" {err.filename}" if err.filename else ""
    when = f" at step {step}" if step is not None else ""
    return (f"cannot write{where}{when}: {err.strerror or err}; free disk space or fix the "
            "folder's permissions, then run the same command again to resume")


# ----------------------------------------------------------------------------- stop signals


class StopSignals:
    """SIGTERM and SIGINT become a stop request that the loop reads after each step.

    One process: Python handlers set the request. Several processes (multi-host): JAX's
    preemption service already owns SIGTERM (its notifier tells every process, and
    `CheckpointManager.reached_preemption(step)` turns true on all of them at the same step),
    so only SIGINT gets a handler, which forwards it as SIGTERM to that service. After the
    first signal the previous handlers come back, so a second Ctrl-C stops at once.
    Handlers can only be set in the main thread; elsewhere (a run in a worker thread) the
    run simply does not react to signals.
    """

    def __init__(self, multihost: bool = False):
        self.multihost = multihost
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            wanted = [signal.SIGINT] if self.multihost else [signal.SIGTERM, signal.SIGINT]
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self._restore()
        if self.multihost:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def should_stop(self, step: int, store) -> bool:
        """Called once per step, by every process: multi-host needs the agreed answer."""
        if self.multihost:
            if store.reached_preemption(step):
                self.received = self.received or "a preemption notice (SIGTERM)"
                return True
            return False
        return self.received is not None


# ----------------------------------------------------------------------------- workdir lock


class WorkdirLock:
    """One run per workdir: an exclusive flock on `<workdir>/deeprnn.lock` for the whole run.

    The kernel drops a flock when its process dies, so a lock left by a killed run never
    blocks. The file names its holder (pid, host, start time) for the refusal message. On a
    filesystem without flock the holder's pid is checked instead (same host only). Remote
    workdirs (gs://) have no lock that a killed run releases: they get none, with a warning.
    `release` deletes the file, and the workdir too when the lock created it and nothing else
    was written (a run refused for its data leaves no trace).
    """

    def __init__(self, workdir: str):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self._created_workdir = False

    def acquire(self) -> WorkdirLock:
        if "://" in self.workdir:
            check_remote_writable(self.workdir)
            logging.warning("%s is remote: no workdir lock is taken; make sure only one run "
                            "uses it at a time", self.workdir)
            return self
        self._created_workdir = not os.path.exists(self.workdir)
        for _ in range(10):  # a releasing holder may delete the file we opened: open it again
            fd = self._open_locked()
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise UsageError(f"--workdir={self.workdir}: its {LOCK_FILE} keeps being replaced; "
                             "is another run starting and stopping there?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }).encode() + b"\n", 0)
        self._fd = fd
        return self

    def _open_locked(self) -> int:
        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UsageError(f"cannot write to --workdir={self.workdir} ({err.strerror or err});"
                             " choose a folder you can write") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) or _holder_alive(holder):
                os.close(fd)
                raise UsageError(
                    f"--workdir={self.workdir} is in use by another run ({_describe(holder)}); "
                    "wait for it to end or stop it, or choose another --workdir") from None
            logging.warning("no flock on %s (%s); its holder is gone, taking it over",
                            self.path, err.strerror)
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held, so no other run holds a deleted file
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None
        if self._created_workdir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                os.rmdir(self.workdir)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def locked_workdir(workdir: str, multihost: bool):
    """The workdir lock for a run of one or several processes: process 0 takes it, and every
    process learns whether it could, so that none waits in a collective for one that stopped."""
    import jax  # deferred: the lock alone needs no JAX (sweeps and tests use WorkdirLock)

    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UsageError as err:
            error = err
    if multihost:  # every process learns process 0's outcome, so none waits in a collective
        from jax.experimental import multihost_utils  # deferred: only multi-host runs need it

        if not int(multihost_utils.broadcast_one_to_all(jax.numpy.int32(error is None))):
            error = error or UsageError("process 0 could not lock --workdir; see its log")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
def check_remote_writable(workdir: str) -> None:
    """One small write and delete in a gs:// workdir, before any training: a machine whose
    service account (or access scopes) cannot write the bucket would otherwise train until its
    first checkpoint and lose that work."""
    probe = epath.Path(workdir) / f".deeprnn-write-check-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("deeprnn checks that this machine can write here\n")
        probe.unlink()
    except Exception as err:  # gcsfs raises its own types (HttpError, ...) besides OSError
        bucket = workdir.split("://", 1)[1].split("/", 1)[0]
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(
            f"cannot write to --workdir={workdir} ({detail}); give this machine's service "
            f"account write access to bucket {bucket} (e.g. roles/storage.objectUser) and the "
            "cloud-platform scope (launch.tpu: up --service_account=NAME@PROJECT."
            "iam.gserviceaccount.com)") from err


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(holder["pid"]) != os.getpid()


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}")


# ----------------------------------------------------------------------------- test faults


def fault_point(point: str, step: int) -> None:
    """Test-only faults, read here and nowhere else: $DEEPRNN_TEST_CRASH_AT holds
    comma-separated ACTION:POINT:STEP items, e.g. `kill:before_record:20`.

    ACTION `kill` sends SIGKILL to this process (no cleanup at all, like a power cut);
    `sigterm` / `sigint` send that signal (the real handlers run). POINTs: `after_step` (the
    step's update was issued), `in_save` (Orbax is writing that step's checkpoint),
    `before_record` (Orbax has finished it, the completion record is not written yet).
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    for item in spec.split(","):
        action, _, rest = item.strip().partition(":")
        if rest != f"{point}:{step}":
            continue
        signum = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM,
                  "sigint": signal.SIGINT}[action]
        os.kill(os.getpid(), signum)
