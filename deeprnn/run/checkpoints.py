"""Orbax checkpoints of a run, each trusted only once its completion record exists.

Orbax finalises a save by renaming a tmp folder (on GCS it writes `commit_success.txt`), but
`CheckpointManager.latest_step()` also counts a bare step folder that a crash left without
its contents. So after a save has *finished* (the async write included) this module writes its
own record, `<dir>/<step>/deeprnn_complete.json`, and restores only steps that have one.
Steps without it are reported and never loaded.

A complete step is one whose record exists: Orbax has finished writing it (files renamed into
place) and only then, on process 0, the record was written and renamed into place itself.

The record also holds a SHA-256 of every array and of the metadata as saved (digests.py), and
every restore checks them before the state is used. A complete checkpoint that cannot be read or
fails its digests was damaged after the save (disk, copy, hand edits): `restore_newest` moves it
aside to `<dir>/.damaged/<step>` (never deleted) with one warning and takes the newest one that
passes, so an unattended run loses only the steps since that one. A checkpoint saved before
digests existed has none and loads as before.

A save that fails (disk full, file-size limit) raises CheckpointWriteError naming the step;
its folder never gets a record, and earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from deeprnn.errors import UsageError
from deeprnn.run import digests
from deeprnn.run.lifecycle import RunFailed, fault_point

COMPLETE_RECORD = "deeprnn_complete.json"
DAMAGED_DIR = ".damaged"  # Orbax lists only integer folder names, so it never reads this one
MAX_RESTORE_TRIES = 20  # newest-first attempts before giving up (each failed one is set aside)


class CheckpointWriteError(RunFailed):
    """A checkpoint save that did not finish (its step is never marked complete)."""


class CheckpointDamaged(UsageError):
    """A complete checkpoint whose files cannot be read or do not match their digests."""

    def __init__(self, directory: epath.Path, step: int, problem: str):
        self.step = step
        super().__init__(f"checkpoint {directory / str(step)} is marked complete but {problem}; "
                         "its files were damaged after the save")


def _os_error_code(err: BaseException) -> int | None:
    """The OS error code behind a failure. Orbax fails in C++ (tensorstore: kilobytes of JSON
    with the code inside, e.g. `File too large [os_error_code='27']`) or in Python (an OSError,
    possibly chained), depending on which file hits the limit first."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    code = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(err))
    return int(code.group(1) or code.group(2)) if code else None


def _first_line(err: BaseException) -> str:
    """The cause in a few words."""
    code = _os_error_code(err)
    if code is not None:
        return f"{os.strerror(code)}, errno {code}"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _fix_for(err: BaseException) -> str:
    if _os_error_code(err) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable"
    return "free disk space (or raise the file-size limit)"


class RunCheckpoints:
    """Saves and restores {state: pytree, meta: json} items under one directory."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
        if "://" not in os.fspath(directory):  # Orbax refuses relative paths (runs/d2l_lstm)
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=False),
        )
        self._unrecorded: list[int] = []
        self._digests: dict[int, dict] = {}  # of saves not yet recorded complete (process 0)

    # -- completion records -------------------------------------------------------------
    def _record_path(self, step: int) -> epath.Path:
        return self.directory / str(step) / COMPLETE_RECORD

    def _write_pending_records(self) -> None:
        """Marks finished saves complete; call only after the manager has finished writing."""
        pending, self._unrecorded = self._unrecorded, []
        # Orbax logs (and swallows) some write errors and then leaves the step unfinalised.
        missing = [s for s in pending if not (self.directory / str(s)).exists()]
        if jax.process_index() == 0:
            for step in pending:
                fault_point("before_record", step)
                if step not in missing:
                    record = {"step": step, digests.ALGORITHM: self._digests.pop(step, None)}
                    tmp = self.directory / str(step) / (COMPLETE_RECORD + ".tmp")
                    tmp.write_text(json.dumps(record))
                    tmp.rename(self._record_path(step))
        if missing:
            self._unrecorded = missing
            with self._failures_named():
                raise OSError(f"Orbax left no folder for step(s) {missing}; see the log above")

    def record_finished_saves(self) -> None:
        """Marks saves that finished in the background complete, without waiting. Cheap: call
        it every step, so that a crash loses only the steps since the newest finished save."""
        if self._unrecorded and not self._manager.is_saving_in_progress():
            self.wait()

    def complete_steps(self) -> list[int]:
        return sorted(s for s in self._manager.all_steps() if self._record_path(s).exists())

    def incomplete_steps(self) -> list[int]:
        done = set(self.complete_steps())
        return sorted(s for s in self._manager.all_steps() if s not in done)

    def latest_complete_step(self) -> int | None:
        self._warn_of_incomplete_steps()
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def _warn_of_incomplete_steps(self) -> None:
        incomplete = self.incomplete_steps()
        if incomplete:
            logging.warning("ignoring incomplete checkpoint step(s) %s in %s (no %s: a save "
                            "that did not finish, or a folder partly deleted); using the newest "
                            "complete one", incomplete, self.directory, COMPLETE_RECORD)

    # -- save / restore -----------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False,
             drop_later: bool = False) -> None:
        """Saves `step`. Orbax skips a step below its newest folder, so folders after `step`
        go first: incomplete ones always (a crash left them; the run resumed before them), and
        complete ones with `drop_later` (best/: a best from a run rewound past it). A complete
        folder at `step` itself is kept (the same run saved the same state before a crash),
        except with `drop_later`: best/ may hold that step from a run that trained otherwise."""
        # The previous async save must finish (and get its record) before this one starts.
        self.wait()
        saved = self._manager.all_steps()
        later = [s for s in saved if s > step]
        if later and not drop_later:  # completion records are read only when it matters (GCS)
            complete = set(self.complete_steps())
            later = [s for s in later if s not in complete]
        if later:
            logging.warning("deleting checkpoint step(s) %s in %s, after step %d that this run "
                            "saves now", later, self.directory, step)
            for stale in later:
                self._manager.delete(stale)
        if step in saved:
            # A step saved before a crash but never completed: replace it.
            if step in self.complete_steps() and not drop_later:
                return
            self._manager.delete(step)
        self._unrecorded.append(step)
        if jax.process_index() == 0:  # the process that writes the completion records
            self._digests[step] = {"state": digests.state_digests(state),
                                   "meta": digests.meta_digest(meta)}
        if not self.directory.exists():  # created at the first save, not before (nothing is
            self.directory.mkdir(parents=True, exist_ok=True)  # left by a run that fails early)
        with self._failures_named():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        fault_point("in_save", step)
        if wait:
            self.wait()

    def wait(self) -> None:
        """Waits for the saves under way and marks them complete; raises CheckpointWriteError
        (and marks none) when one failed."""
        with self._failures_named():
            self._manager.wait_until_finished()
        self._write_pending_records()

    @contextlib.contextmanager
    def _failures_named(self):
        try:
            yield
        except Exception as err:  # Orbax/tensorstore raise plain Exceptions on write errors
            failed, self._unrecorded = self._unrecorded, []
            self._digests.clear()
            good = self.complete_steps()
            raise CheckpointWriteError(
                f"saving checkpoint step {', '.join(map(str, failed)) or '?'} in "
                f"{self.directory} failed ({_first_line(err)}); the newest complete checkpoint "
                f"({'step ' + str(good[-1]) if good else 'none'}) is intact: {_fix_for(err)} "
                "and run the same command again to resume"
            ) from err

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: true on every process at the same step once any got a preemption
        notice (Orbax's check over JAX's preemption service)."""
        return self._manager.reached_preemption(step)

    def read_record(self, step: int) -> dict:
        try:
            return json.loads(self._record_path(step).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointDamaged(self.directory, step, f"its {COMPLETE_RECORD} cannot be "
                                    f"read ({_first_line(err)})") from err

    def read_meta(self, step: int, record: dict | None = None) -> dict:
        """The step's metadata, checked against its digest (CheckpointDamaged otherwise);
        `record` is its completion record when the caller has read it already."""
        record = self.read_record(step) if record is None else record
        recorded = (record.get(digests.ALGORITHM) or {}).get("meta")
        try:
            meta = dict(self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as err:  # noqa: BLE001 - any failure to read is a damaged folder
            raise CheckpointDamaged(self.directory, step,
                                    f"cannot be read ({_first_line(err)})") from err
        if recorded is not None and digests.meta_digest(meta) != recorded:
            raise CheckpointDamaged(self.directory, step, "its metadata fails its digest")
        return meta

    def restore(self, step: int, target_state: Any,
                meta: dict | None = None) -> tuple[Any, dict]:
        """(state, meta) of the step, both checked against their digests (CheckpointDamaged
        otherwise; a checkpoint saved before digests has none to check). `meta` is the step's
        metadata when the caller has read it already with `read_meta` (on a gs:// workdir each
        read is a round trip)."""
        record = self.read_record(step)
        meta = self.read_meta(step, record) if meta is None else meta
        recorded = (record.get(digests.ALGORITHM) or {}).get("state")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        failure = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as err:  # noqa: BLE001 - tensorstore raises plain Exception
            failure = CheckpointDamaged(self.directory, step,
                                        f"cannot be read ({_first_line(err)})")
        if failure is not None:
            # Raised outside the except block: the tensorstore error's traceback holds the
            # reads still pending, which then linger (and warn) until the process ends.
            raise failure
        bad = digests.mismatches(recorded or {}, restored.state)
        if bad:
            named = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise CheckpointDamaged(self.directory, step,
                                    f"{len(bad)} array(s) fail their digests ({named})")
        return restored.state, meta

    def restore_newest(self, target_for: Callable[[dict], Any], *, move_damaged: bool = True):
        """(step, state, meta) of the newest complete checkpoint that reads back whole, or None.

        `target_for(meta)` gives the state structure to restore for that checkpoint's meta (it
        may refuse with a UsageError, which goes to the caller). A damaged checkpoint is moved
        aside with one warning (only passed over, with the warning, when `move_damaged` is
        False: a program that does not hold the workdir's lock must not move what a training
        run beside it may be deleting) and the next newest is tried; one deleted while it was
        read (another process on the workdir keeps only --max_to_keep) is passed over.
        """
        self._warn_of_incomplete_steps()
        tried: set[int] = set()
        for _ in range(MAX_RESTORE_TRIES):
            self._manager.reload()  # another process may have saved or deleted steps
            candidates = [s for s in self.complete_steps() if s not in tried]
            if not candidates:
                return None
            step = candidates[-1]
            tried.add(step)
            try:
                meta = self.read_meta(step)
                state, meta = self.restore(step, target_for(meta), meta)
                return step, state, meta
            except CheckpointDamaged as damage:
                if not (self.directory / str(step)).exists():
                    logging.warning("checkpoint step %d in %s was deleted while it was read "
                                    "(a run on this workdir keeps --max_to_keep); reading the "
                                    "next one", step, self.directory)
                    continue
                if move_damaged:
                    self.move_aside(step, damage)
                else:
                    logging.warning("%s; passing over it (a training run on this workdir moves "
                                    "it aside)", damage)
        raise UsageError(f"no readable checkpoint in {self.directory} after {MAX_RESTORE_TRIES}"
                         " tries; check the folder")

    def move_aside(self, step: int, damage: CheckpointDamaged) -> None:
        """Moves a damaged step to <dir>/.damaged/<step> (kept for a look, never deleted)."""
        aside = self.directory / DAMAGED_DIR / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            suffix = 1
            while aside.exists():  # the same step damaged twice: keep both
                aside, suffix = aside.parent / f"{step}.{suffix}", suffix + 1
            (self.directory / str(step)).rename(aside)
        logging.warning("%s; moved it to %s and using the newest checkpoint before it",
                        damage, aside)
        self._manager.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


# ----------------------------------------------------------------------------- best/
# `<workdir>/best/<step>`: the parameters with the best validation perplexity so far, which
# the test score uses. Only runs with a validation split have one.

def save_best(workdir: str, params: Any, step: int) -> None:
    best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
    best.save(step, {"params": params}, {"step": step}, wait=True, drop_later=True)
    best.close()


def drop_best(workdir: str) -> None:
    """A run that starts from step 0 drops a best/ left by an earlier start, as it drops that
    start's logs: its test score must come from this run's own parameters."""
    best = epath.Path(workdir) / "best"
    if jax.process_index() == 0 and best.exists():
        logging.warning("deleting %s, left by a start of this run that saved no checkpoint",
                        best)
        best.rmtree()


def restore_best(workdir: str, params: Any) -> tuple[Any, int | None]:
    """(best parameters, their step), or (`params`, None) when the run saved no best, or its
    best is damaged (moved aside with a warning)."""
    best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
    try:
        found = best.restore_newest(lambda meta: {"params": params})
    finally:
        best.close()
    return (found[1]["params"], found[0]) if found else (params, None)
