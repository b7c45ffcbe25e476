"""Orbax checkpoints of a run, each trusted only once its completion record exists.

Orbax finalises a save by renaming a tmp folder (on GCS it writes `commit_success.txt`), but
`CheckpointManager.latest_step()` also counts a bare step folder that a crash left without
its contents. So after a save has *finished* (the async write included) this module writes its
own record, `<dir>/<step>/deeprnn_complete.json`, and restores only steps that have one.
Steps without it are reported and never loaded.

A complete step is one whose record exists: Orbax has finished writing it (files renamed into
place) and only then, on process 0, the record was written and renamed into place itself.

A complete checkpoint that cannot be read is refused, not skipped: its record says it was
whole once, so its files were damaged afterwards (disk, copy, hand edits). Falling back on
our own would hide that and then keep training over the damaged folder; the error names the
folder and the earlier step that deleting it would resume from, and changes nothing.

A save that fails (disk full, file-size limit) raises CheckpointWriteError naming the step;
its folder never gets a record, and earlier checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from deeprnn.errors import UsageError
from deeprnn.run.lifecycle import RunFailed, fault_point

COMPLETE_RECORD = "deeprnn_complete.json"


class CheckpointWriteError(RunFailed):
    """A checkpoint save that did not finish (its step is never marked complete)."""


def _first_line(err: BaseException) -> str:
    """The cause in a few words. Orbax fails in C++ (tensorstore: kilobytes of JSON with the
    OS error code inside, e.g. `File too large [os_error_code='27']`) or in Python (an
    OSError, possibly chained), depending on which file hits the limit first."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return f"{os.strerror(cause.errno)}, errno {cause.errno}"
        cause = cause.__cause__ or cause.__context__
    text = str(err).strip()
    code = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", text)
    if code:
        errno = int(code.group(1) or code.group(2))
        return f"{os.strerror(errno)}, errno {errno}"
    lines = text.splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


class RunCheckpoints:
    """Saves and restores {state: pytree, meta: json} items under one directory."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
        if "://" not in os.fspath(directory):  # Orbax refuses relative paths (runs/d2l_lstm)
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True),
        )
        self._unrecorded: list[int] = []

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
                    tmp = self.directory / str(step) / (COMPLETE_RECORD + ".tmp")
                    tmp.write_text(json.dumps({"step": step}))
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
        incomplete = self.incomplete_steps()
        if incomplete:
            logging.warning("ignoring incomplete checkpoint step(s) %s in %s (no %s: the run "
                            "stopped while saving them); resuming from the newest complete one",
                            incomplete, self.directory, COMPLETE_RECORD)
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # -- save / restore -----------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False,
             drop_later: bool = False) -> None:
        """Saves `step`. Orbax skips a step below its newest folder, so folders after `step`
        go first: incomplete ones always (a crash left them; the run resumed before them), and
        complete ones with `drop_later` (best/: a best from a run rewound past it)."""
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
            if step in self.complete_steps():
                return
            self._manager.delete(step)
        self._unrecorded.append(step)
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
            good = self.complete_steps()
            raise CheckpointWriteError(
                f"saving checkpoint step {', '.join(map(str, failed)) or '?'} in "
                f"{self.directory} failed ({_first_line(err)}); the newest complete checkpoint "
                f"({'step ' + str(good[-1]) if good else 'none'}) is intact: free disk space "
                "(or raise the file-size limit) and run the same command again to resume"
            ) from err

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: true on every process at the same step once any got a preemption
        notice (Orbax's check over JAX's preemption service)."""
        return self._manager.reached_preemption(step)

    def read_meta(self, step: int) -> dict:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - any failure to read is a damaged folder
            raise self._unreadable(step, err) from err
        return dict(restored.meta)

    def _unreadable(self, step: int, err: BaseException) -> UsageError:
        earlier = [s for s in self.complete_steps() if s < step]
        fallback = (f"resume from step {earlier[-1]}, the previous complete one" if earlier
                    else "start from scratch")
        return UsageError(
            f"checkpoint {self.directory / str(step)} is marked complete but cannot be read "
            f"({_first_line(err)}); its files were damaged after the save: restore them, or "
            f"delete that folder to {fallback}")

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        failure = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - tensorstore raises plain Exception
            failure = self._unreadable(step, err)
        if failure is not None:
            # Raised outside the except block: the tensorstore error's traceback holds the
            # reads still pending, which then linger (and warn) until the process ends.
            raise failure
        return restored.state, dict(restored.meta)

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


def restore_best(workdir: str, params: Any) -> tuple[Any, int | None]:
    """(best parameters, their step), or (`params`, None) when the run saved no best."""
    best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
    step = best.latest_complete_step()
    if step is not None:
        params = best.restore(step, {"params": params})[0]["params"]
    best.close()
    return params, step
