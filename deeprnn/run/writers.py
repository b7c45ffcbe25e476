"""What a run logs in its workdir as it trains: TensorBoard events and metrics.jsonl
(summary.json is `summary.py`, the console progress line `console.py`).

Only process 0 writes (`RunWriter(enabled=False)` elsewhere), as in big_vision.

Workdirs may be local paths or `gs://` URLs (issue 8). GCS objects cannot be appended to, so
every file here is written whole: metrics.jsonl is kept in memory and rewritten on `flush()`,
summary.json on each `summary.write_summary`. Whole rewrites are also what makes the files safe
to read at any moment: a local rewrite goes through a temporary file and `os.replace`, and a GCS
upload replaces the object in one step, so a reader (or a crash) never sees half a line. The
price is O(file size) per flush, which is small: a run logs thousands of lines, not millions.

tensorboardX can write `gs://` itself only through `google-cloud-storage` (its GCSRecordWriter
re-uploads the whole event file from memory on every flush). We instead write the event file to
a local temporary folder and upload it with `etils.epath` on `flush()`: the same cost, one
remote-file layer for everything (gcsfs, the `[gcs]` extra), and testable offline. Local
workdirs are plain files and never need gcsfs.

tensorboardX is imported only when a RunWriter that writes events is built (it is absent on the
lent GPU machines), and with torch hidden: see `_import_tensorboardx`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from typing import Any

from etils import epath

from deeprnn.errors import UsageError

METRICS_FILE = "metrics.jsonl"


def _is_remote(workdir: str) -> bool:
    return "://" in os.fspath(workdir)


def _import_tensorboardx() -> types.SimpleNamespace:
    """The parts of tensorboardX a RunWriter uses, imported on first use with torch hidden.

    Deferred because tensorboardX is absent on the lent GPU machines (--notensorboard runs
    there). Torch is hidden because tensorboardX's writer module imports it, where installed,
    only to accept torch tensors, which this module never passes: 1.3 s of every run's startup
    on the 2-core CPU, more than the recipe's first compiled call. Hidden, the import fails
    inside tensorboardX's own `except ImportError`, and torch stays importable afterwards."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:  # deferred: see the docstring
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.plugin_text_pb2 import TextPluginData
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboardX.proto.tensor_pb2 import TensorProto
        from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboardX.summary import hparams
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return types.SimpleNamespace(
        EventsWriter=EventsWriter, Event=Event, SessionLog=SessionLog,
        TextPluginData=TextPluginData, Summary=Summary, SummaryMetadata=SummaryMetadata,
        TensorProto=TensorProto, TensorShapeProto=TensorShapeProto, hparams=hparams)


def write_text_whole(path: epath.Path, text: str) -> None:
    """Replaces the file's content in one step, so readers see the old or the new text only."""
    if _is_remote(os.fspath(path)):
        path.write_text(text)  # A GCS upload creates the new object generation atomically.
        return
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    # A full disk fails in write/fsync, which name no file, and the temporary file's name
    # means nothing to the user: either way the error names `path`.
    with _naming_the_file(path, instead_of=tmp):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # The data is on disk before the rename makes it visible.
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def _naming_the_file(path, instead_of: str | None = None) -> Iterator[None]:
    """An OSError without a file name, or naming `instead_of` (a temporary file the user
    never asked for), gets `path` as its file name."""
    try:
        yield
    except OSError as err:
        if err.filename is None or (instead_of is not None and err.filename == instead_of):
            raise OSError(err.errno, err.strerror, os.fspath(path)) from err
        raise


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl` in step order; [] when the file does not exist.
    A torn last line (a crash or a full disk mid-write) is dropped with a warning."""
    return _read_records(epath.Path(workdir) / METRICS_FILE)[0]


def _read_records(path: epath.Path) -> tuple[list[dict], bool]:
    """(records, whether a torn last line was dropped); a damaged line before the last is a
    UsageError naming it: dropping it would lose history silently."""
    if not path.exists():
        return [], False
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if index == len(lines) - 1:
                logging.warning("%s line %d, the last, is cut off (%s); dropped it (a resumed "
                                "run logs steps after its checkpoint again)", path, number, e.msg)
                return records, True
            raise UsageError(
                f"{path} line {number} of {len(lines)} is not JSON ({e.msg}): repair that line "
                "or delete it (the lines after it are fine)") from None
    return records, False


class RunWriter:
    """TensorBoard scalars, text and hparams in the workdir itself (so that `tensorboard
    --logdir=SWEEP_DIR` overlays runs), and the same scalars as lines of metrics.jsonl.

    `flush()` is the durability point: what was written before it survives a crash. Call it
    just before each checkpoint save (after that step's scalars): then every complete checkpoint
    k has steps <= k in both metrics.jsonl and TensorBoard, and a resume misses none. Events
    are written synchronously for that reason: tensorboardX's SummaryWriter queues them to a
    thread, and its flush() does not wait for the queue. On a local workdir events also reach
    the disk every 30 s by themselves, for a live TensorBoard.

    `resume_step=k` says the run restarts after step k: records with step > k are dropped from
    metrics.jsonl at once, and TensorBoard is told to hide events with step > k (a
    SessionLog.START event at step k+1, tensorboardX's purge_step, honoured by TensorBoard's
    loaders). A run that starts from no checkpoint over a workdir with leftovers passes
    `resume_step=-1`, which drops everything; `None` keeps what is there (e.g. a later
    evaluation adding to a finished run).
    """

    EVENTS_FLUSH_EVERY_S = 30.0

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = enabled
        self._closed = not enabled
        self._events = self._local_event_dir = self._session_end = None
        if not enabled:
            return
        self._workdir_path = epath.Path(self.workdir)
        self._workdir_path.mkdir(parents=True, exist_ok=True)
        self._metrics_path = self._workdir_path / METRICS_FILE
        self._records, repaired = _read_records(self._metrics_path)
        if resume_step is not None:
            kept = [r for r in self._records if r.get("step", -math.inf) <= resume_step]
            repaired |= len(kept) != len(self._records)
            self._records = kept
        if repaired:
            self._write_metrics()
        if not tensorboard:  # metrics.jsonl and summary.json only (--notensorboard)
            return
        purge_step = self._purge_step(resume_step)

        self._tbx = tbx = _import_tensorboardx()

        # Remote workdirs: events go to a local folder and are uploaded on flush().
        self._local_event_dir = (
            tempfile.mkdtemp(prefix="deeprnn-events-") if _is_remote(self.workdir) else None
        )
        self._events = tbx.EventsWriter(
            os.path.join(self._local_event_dir or self.workdir, "events"),
            # tensorboardX names files by the second; a suffix in nanoseconds keeps a restart
            # within the same second from overwriting the previous file, and keeps the files
            # sorted in the order written, which is the order TensorBoard reads them in.
            filename_suffix=f".{time.time_ns()}",
        )
        self._events_flushed_at = time.monotonic()
        if purge_step is not None:
            start = tbx.SessionLog(status=tbx.SessionLog.START)
            self._write_event(purge_step, session_log=start)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars and one metrics.jsonl record `{"step": step, **values}`; values
        written at the same step as the previous call join that step's record."""
        if self._closed:
            return
        step = int(step)
        values = {tag: float(value) for tag, value in values.items()}
        if self._events is not None:
            summary = self._tbx.Summary(value=[
                self._tbx.Summary.Value(tag=tag, simple_value=value)
                for tag, value in values.items()])
            self._write_event(step, summary=summary)
        if self._records and self._records[-1].get("step") == step:
            self._records[-1].update(values)
        else:
            self._records.append({"step": step, **values})

    def texts(self, step: int, values: dict[str, str]) -> None:
        """TensorBoard text under exactly the given tags (e.g. `samples/time traveller`):
        tensorboardX's add_text would append `/text_summary` to each tag."""
        if self._closed or self._events is None:
            return
        tbx = self._tbx
        metadata = tbx.SummaryMetadata(
            plugin_data=tbx.SummaryMetadata.PluginData(
                plugin_name="text", content=tbx.TextPluginData(version=0).SerializeToString()
            )
        )
        summary = tbx.Summary()
        for tag, text in values.items():
            tensor = tbx.TensorProto(
                dtype="DT_STRING",
                string_val=[str(text).encode("utf-8")],
                tensor_shape=tbx.TensorShapeProto(dim=[tbx.TensorShapeProto.Dim(size=1)]),
            )
            summary.value.add(tag=tag, metadata=metadata, tensor=tensor)
        self._write_event(int(step), summary=summary)

    def hparams(self, hparams: dict, metric_names: list[str]) -> None:
        """The run's hyperparameters in TensorBoard's HParams dashboard, with `metric_names`
        (scalar tags such as `validation/perplexity`) as its metric columns.

        The summaries go into the run's own event file: tensorboardX's add_hparams would write
        them into a new sub-run named by the time, which splits every run of a sweep in two.
        Values other than bool, number and str are shown by their str (tuples, None, paths).
        """
        if self._closed or self._events is None:
            return
        experiment, session_start, self._session_end = self._tbx.hparams(
            {name: _hparam_value(value) for name, value in hparams.items()},
            dict.fromkeys(metric_names, 0.0),
        )
        self._write_event(0, summary=experiment)
        self._write_event(0, summary=session_start)

    def flush(self) -> None:
        if self._closed:
            return
        self._write_metrics()
        self._flush_events()
        if self._local_event_dir:
            for name in os.listdir(self._local_event_dir):
                with open(os.path.join(self._local_event_dir, name), "rb") as f:
                    (self._workdir_path / name).write_bytes(f.read())

    def close(self) -> None:
        if self._closed:
            return
        if self._session_end is not None:
            # The HParams dashboard shows a run as finished once this is written.
            self._write_event(0, summary=self._session_end)
        self.flush()
        if self._events is not None:
            self._events.close()
        self._closed = True
        if self._local_event_dir:
            shutil.rmtree(self._local_event_dir, ignore_errors=True)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _purge_step(self, resume_step: int | None) -> int | None:
        """The step of the SessionLog.START event that opens this writer's event file, if any.

        TensorBoard hides earlier events with step >= a START's step. Its Python loader
        (`--load_fast=false`) treats the first START of a run as the session's start and purges
        only on later ones, so a fresh run writes a START too (at step 0, hiding nothing).
        """
        if resume_step is not None:
            return resume_step + 1
        has_events = any("tfevents" in path.name for path in self._workdir_path.iterdir())
        return None if has_events else 0

    def _write_event(self, step: int, **fields) -> None:
        self._events.write_event(self._tbx.Event(wall_time=time.time(), step=step, **fields))
        if not self._local_event_dir:
            if time.monotonic() - self._events_flushed_at >= self.EVENTS_FLUSH_EVERY_S:
                self._flush_events()

    def _flush_events(self) -> None:
        if self._events is not None:
            with _naming_the_file(getattr(self._events, "_file_name", self.workdir)):
                self._events.flush()  # file flush + fsync
        self._events_flushed_at = time.monotonic()

    def _write_metrics(self) -> None:
        text = "".join(json.dumps(record) + "\n" for record in self._records)
        write_text_whole(self._metrics_path, text)


def _hparam_value(value: Any) -> bool | float | int | str:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy / jax scalars
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)
