"""Where the libraries' warnings and tracebacks go while a program runs: a file in the workdir.

Orbax logs a failed background write once per thread that waits on it, each with a traceback
(8 of them, five minutes apart, when the checkpoint folder was unwritable), around the one
`error:` line the training program prints, and tensorstore's C++ threads print Python
tracebacks of their own ("Event loop is closed", through sys.excepthook) when a failed save's
loop is gone. Records from Orbax and tensorstore, and tracebacks that reach sys.excepthook,
threading.excepthook or sys.unraisablehook while a program runs, go to `<workdir>/deeprnn.log`
(appended to by every process of a multi-host run; it starts before JAX knows which process
it is) instead of the console, which keeps deeprnn's own warnings;
the error line names the file. An exception that ends the program still reaches the console:
the hooks are restored as it leaves the context. The file is created by its first record
only, so a clean run leaves none; a remote workdir's goes to the local temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading

LOG_FILE = "deeprnn.log"
LIBRARY_PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")


class _LibraryRecords(logging.Filter):
    """Keeps (or, inverted, drops) the records that the libraries above logged."""

    def __init__(self, keep: bool):
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        library = getattr(record, "library", False) or any(
            part in record.pathname for part in LIBRARY_PATHS)
        return library == self.keep


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler that makes its folder when the first record arrives, not before."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()

    def handleError(self, record) -> None:
        """A full disk fails this file too: logging would print its own traceback on the
        console, the very thing this file is for keeping off it."""


def log_path(workdir: str) -> str:
    if "://" in os.fspath(workdir):  # a FileHandler cannot append to a Cloud Storage object
        return os.path.join(tempfile.gettempdir(), f"deeprnn-{os.getpid()}-{LOG_FILE}")
    return os.path.join(os.path.abspath(workdir), LOG_FILE)


@contextlib.contextmanager
def library_log(workdir: str):
    """Sends the libraries' records to the log file (yielded) instead of the console."""
    path = log_path(workdir)
    handler = _LazyFileHandler(path, delay=True)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_LibraryRecords(keep=True))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(pathname)s:%(lineno)d "
                                           "[%(threadName)s] %(message)s"))
    root = logging.getLogger()
    quiet = _LibraryRecords(keep=False)
    consoles = list(root.handlers)
    for console in consoles:
        console.addFilter(quiet)
    root.addHandler(handler)

    def to_file(kind: str, exc_type, exc, tb) -> None:
        record = logging.LogRecord("deeprnn.library_log", logging.ERROR, __file__, 0,
                                   f"{kind}: {exc_type.__name__}: {exc}", None,
                                   (exc_type, exc, tb))
        record.library = True
        handler.handle(record)

    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    sys.excepthook = lambda *exc: to_file("traceback", *exc)
    threading.excepthook = lambda a: to_file(f"in thread {a.thread and a.thread.name}",
                                             a.exc_type, a.exc_value, a.exc_traceback)
    sys.unraisablehook = lambda u: to_file(f"ignored in {u.object!r}", u.exc_type,
                                           u.exc_value, u.exc_traceback)
    try:
        yield path
    finally:
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        root.removeHandler(handler)
        handler.close()
        for console in consoles:
            console.removeFilter(quiet)


def mention(path: str) -> str:
    """`; the libraries' log: PATH` when that log has something in it, else nothing."""
    return f"; details in {path}" if os.path.exists(path) else ""
