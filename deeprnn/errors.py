"""The one exception type for bad input, and how every program turns it into one line.

A UsageError becomes `error: <message>` on stderr and exit status 2. Programs parse their flags
in one of two ways, both ending a bad flag in that one line: `parse_flags_or_exit` for
`app.run` over absl's global FLAGS (train, generate, evaluate, report, corpora), and
`parse_argv` on a fresh FlagValues for programs that tests and sweeps also call in-process
with an argument list (the benchmark and the launchers).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

EXIT_USAGE = 2
HELP_ARGS = ("--help", "-h", "-?", "--helpfull", "--helpshort")


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix, on one line."""


EXIT_IO = 1  # a file that could not be read or written: not the flags' fault


@contextlib.contextmanager
def exit_on_usage_error():
    """For program entry points: a UsageError becomes `error: <message>` on stderr and exit
    status 2, an OSError (a file that cannot be read or written) `error: <file>: <reason>` and
    status 1, instead of a traceback."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_IO)


def _program_name(argv0: str) -> str:
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec else argv0


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parser, for `app.run(main, flags_parser=parse_flags_or_exit)`.

    A bad flag or flagfile, or a positional argument (no program takes one), is one `error:`
    line and status 2 (absl's own message is a FATAL line plus a hint, and status 1); --help
    and --helpfull print the flags and exit 0 (absl's exit 1, which means a failed write
    here). An unset --verbosity means WARNING: Orbax logs every checkpoint
    read and write at INFO, which buries the progress line and the program's output. It is set
    here because app.run turns an unset --verbosity into INFO right after this parser returns.
    """
    program = _program_name(argv[0])
    if any(arg in HELP_ARGS for arg in argv[1:]):  # absl's own help flags exit with status 1
        print(_help(full="--helpfull" in argv[1:]))
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {_flag_error(err)}; see {program} --helpfull", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if len(remaining) > 1:  # absl would hand them to main, which has no use for them
        print(f"error: unexpected argument(s) {' '.join(map(repr, remaining[1:]))}: every "
              "setting is a --flag, and a value with spaces needs quotes (--prefix=\"the time "
              f"traveller\"); see {program} --helpfull", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = absl_logging.WARNING
    return remaining


def parse_argv(define_flags: Callable, argv: Sequence[str], program: str):
    """(flag values, positional arguments) of `python -m program ARGV`, on a fresh absl
    FlagValues that `define_flags(flag_values)` fills: a bad flag raises UsageError, and
    --help prints the flags and exits 0. absl reads `--flagfile` here as everywhere."""
    values = flags.FlagValues()
    define_flags(values)
    if any(arg in HELP_ARGS for arg in argv):
        print(f"usage: python -m {program} [flags]\n\n{values.get_help()}")
        sys.exit(0)
    try:
        positional = values([program, *argv])[1:]
    except flags.Error as err:
        raise UsageError(f"{_flag_error(err)}; see python -m {program} --help") from err
    return values, positional


def _help(full: bool) -> str:
    """--helpfull: every flag; --help: the program's own (not absl's or Orbax's)."""
    if full:
        return flags.FLAGS.get_help()
    libraries = ("absl.", "orbax.", "jax.", "jaxlib.", "tensorflow")
    modules = [m for m in flags.FLAGS.flags_by_module_dict() if not m.startswith(libraries)]
    return "\n\n".join(flags.FLAGS.module_help(m) for m in modules)


def _flag_error(err: Exception) -> str:
    message = str(err).removeprefix("ERROR:: ")  # absl prefixes flagfile errors
    if "Unable to open flagfile" in message:
        # absl reads a flagfile path, a nested one too, from the current folder.
        message += " (flagfile paths, nested ones too, are read from the current folder: " \
                   "run from the repository root)"
    return message
