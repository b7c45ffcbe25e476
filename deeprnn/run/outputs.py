"""Checks that a program's output path can be written, made before the work that produces it.

`evaluate --output=FILE` scored the whole text first and then failed to write, naming its
temporary file (`FILE.tmp-123: Is a directory`) or the wrong path (`File exists` for a parent
that is a file); `report --out=DIR` failed the same way. These checks run first and name the
flag, the path and the fix. Local paths only: a gs:// path is checked by its write, as before
(a bucket's permissions cannot be read without writing).
"""

from __future__ import annotations

import os

from deeprnn.errors import UsageError


def _is_remote(path: str) -> bool:
    return "://" in os.fspath(path)


def check_output_file(path: str, flag: str) -> None:
    """A local file path the program can create or replace; missing folders above it are made
    when it is written, so the nearest folder that exists must be writable."""
    if _is_remote(path):
        return
    if os.path.isdir(path):
        raise UsageError(f"--{flag}={path} is a folder; give a file path, e.g. "
                         f"{os.path.join(path, 'result.json')}")
    _check_can_make_in(os.path.dirname(os.path.abspath(path)), f"--{flag}={path}",
                       "give a file path in a folder you can write")


def check_output_folder(path: str, flag: str, fix: str = "") -> None:
    """A local folder the program can write files into (made if missing). `fix` replaces
    the default advice (e.g. to suggest another flag)."""
    if _is_remote(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{flag}={path} is a file, not a folder; {fix or 'give a folder'}")
    _check_can_make_in(os.path.abspath(path), f"--{flag}={path}",
                       fix or "give a folder you can write")


def _check_can_make_in(folder: str, what: str, fix: str) -> None:
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{what}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: cannot write in {existing} (permission denied); {fix}")
