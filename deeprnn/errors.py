"""The one exception type for bad input, and how every program turns it into one line.

A UsageError becomes `error: <message>` on stderr and exit status 2. Programs parse their flags
in one of two ways, both ending a bad flag in that one line: `parse_flags_or_exit` for
`app.run` over absl's global FLAGS (train, generate, evaluate, report, corpora), and
`parse_argv` on a fresh FlagValues for programs that tests and sweeps also call in-process
with an argument list (the benchmark and the launchers).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

EXIT_USAGE = 2
# absl's help flags (and -h) -> the help each prints. absl takes one dash or two and a boolean
# value (--help=true), prints the help and exits with status 1; here every form exits 0.
HELP_FLAGS = {"help": "short", "h": "short", "?": "short", "helpshort": "short",
              "helpfull": "full", "helpxml": "xml"}
_TRUE = ("true", "t", "1")  # absl's spellings of a true boolean (any case)


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
    line and status 2 (absl's own message is a FATAL line plus a hint, and status 1); every
    help form (`help_form`) prints the flags and exits 0 (absl's exit 1, which means a failed
    write here). An unset --verbosity means WARNING: Orbax logs every checkpoint
    read and write at INFO, which buries the progress line and the program's output. It is set
    here because app.run turns an unset --verbosity into INFO right after this parser returns.
    """
    program = _program_name(argv[0])
    form = help_form(argv[1:])
    if form:  # absl's own help flags exit with status 1
        _print_help(flags.FLAGS, form, _help(full=form == "full"))
        sys.exit(0)
    try:
        remaining = flags.FLAGS(argv)
    except (flags.Error, UnicodeDecodeError) as err:
        print(f"error: {_flag_error(err, argv[1:])}; see {program} --helpfull", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except SystemExit as done:  # a help flag inside a flagfile: absl printed it, status 1
        sys.exit(0 if done.code == 1 else done.code)
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
    form = help_form(argv)
    if form:
        _print_help(values, form, f"usage: python -m {program} [flags]\n\n{values.get_help()}")
        sys.exit(0)
    try:
        positional = values([program, *argv])[1:]
    except (flags.Error, UnicodeDecodeError) as err:
        raise UsageError(f"{_flag_error(err, argv)}; see python -m {program} --help") from err
    return values, positional


def help_form(args: Sequence[str]) -> str | None:
    """Which help the arguments ask for, in any of absl's spellings (--help, -help,
    --help=true, -?, --helpfull, --helpshort, --helpxml) or -h: "short", "full", "xml", or
    None. Arguments after `--` are not flags."""
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, has_value, value = arg[2 if arg.startswith("--") else 1:].partition("=")
        if name in HELP_FLAGS and (not has_value or value.lower() in _TRUE):
            return HELP_FLAGS[name]
    return None


def _print_help(values: flags.FlagValues, form: str, text: str) -> None:
    if form == "xml":
        values.write_help_in_xml_format(sys.stdout)
    else:
        print(text)


def _help(full: bool) -> str:
    """--helpfull: every flag; --help: the program's own (not absl's or Orbax's)."""
    if full:
        return flags.FLAGS.get_help()
    libraries = ("absl.", "orbax.", "jax.", "jaxlib.", "tensorflow")
    modules = [m for m in flags.FLAGS.flags_by_module_dict() if not m.startswith(libraries)]
    return "\n\n".join(flags.FLAGS.module_help(m) for m in modules)


def _flag_error(err: Exception, args: Sequence[str]) -> str:
    if isinstance(err, UnicodeDecodeError):  # absl reads a flagfile as text, naming no file
        where = _undecodable_flagfile(args)
        return (f"{f'flagfile {where}' if where else 'a flagfile'} is not text (byte "
                f"0x{err.object[err.start]:02x} at offset {err.start} is not "
                f"{err.encoding}); a flagfile holds --flag=value lines, one a line")
    message = str(err).removeprefix("ERROR:: ")  # absl prefixes flagfile errors
    if "Unable to open flagfile" in message:
        # absl reads a flagfile path, a nested one too, from the current folder.
        message += " (flagfile paths, nested ones too, are read from the current folder: " \
                   "run from the repository root)"
    return message


def _undecodable_flagfile(args: Sequence[str], depth: int = 0) -> str | None:
    """The first flagfile named in `args`, or in a flagfile they name, that is not text."""
    for index, arg in enumerate(args):
        name, has_value, value = arg.lstrip("-").partition("=")
        if name != "flagfile" or not arg.startswith("-"):
            continue
        path = value if has_value else (args[index + 1] if index + 1 < len(args) else "")
        try:
            with open(os.path.expanduser(path)) as f:  # as absl opens it
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            return path
        except OSError:
            continue
        if depth < 8 and (nested := _undecodable_flagfile([s.strip() for s in lines],
                                                          depth + 1)):
            return nested
    return None
