"""Orbax checkpoints of a run, each trusted only once its completion record exists.

Orbax finalises a save by renaming a tmp folder (on GCS it writes `commit_success.txt`), but
`CheckpointManager.latest_step()` also counts a bare step folder that a crash left without
its contents. So after a save has *finished* (the async write included) this module writes its
own record, `<dir>/<step>/deeprnn_complete.json`, and restores only steps that have one.
Steps without it are reported and never loaded.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from deeprnn.errors import UsageError

COMPLETE_RECORD = "deeprnn_complete.json"


class RunCheckpoints:
    """Saves and restores {state: pytree, meta: json} items under one directory."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
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
        if jax.process_index() == 0:
            for step in self._unrecorded:
                if (self.directory / str(step)).exists():
                    tmp = self.directory / str(step) / (COMPLETE_RECORD + ".tmp")
                    tmp.write_text(json.dumps({"step": step}))
                    tmp.rename(self._record_path(step))
        self._unrecorded = []

    def complete_steps(self) -> list[int]:
        return sorted(s for s in self._manager.all_steps() if self._record_path(s).exists())

    def incomplete_steps(self) -> list[int]:
        done = set(self.complete_steps())
        return sorted(s for s in self._manager.all_steps() if s not in done)

    def latest_complete_step(self) -> int | None:
        incomplete = self.incomplete_steps()
        if incomplete:
            logging.warning("ignoring incomplete checkpoint(s) %s in %s (no %s)",
                            incomplete, self.directory, COMPLETE_RECORD)
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # -- save / restore -----------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict, *, wait: bool = False) -> None:
        # Orbax waits for the previous async save before starting this one, so every step
        # queued before it has finished by now.
        self._manager.wait_until_finished()
        self._write_pending_records()
        if step in self._manager.all_steps():
            # A step saved before a crash but never completed: replace it.
            if step in self.complete_steps():
                return
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._unrecorded.append(step)
        if wait:
            self.wait()

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._write_pending_records()

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, OSError, KeyError) as err:  # truncated or corrupted files
            raise UsageError(
                f"checkpoint {self.directory / str(step)} cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); delete that step folder to resume from an "
                "earlier one") from err
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        self.wait()
        self._manager.close()
