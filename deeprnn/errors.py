"""The one exception type that entry points turn into a one-line message and exit status 2,
and the flag parser every entry point gives absl's app.run."""

import contextlib
import sys

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user: the message names the problem and the fix, on one line."""


@contextlib.contextmanager
def exit_on_usage_error():
    """For program entry points: a UsageError becomes `error: <message>` on stderr and exit
    status 2, instead of a traceback."""
    try:
        yield
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parser, for `app.run(main, flags_parser=parse_flags_or_exit)`.

    A bad flag or flagfile is one `error:` line and status 2 (absl's own message is a FATAL line
    plus a hint, and status 1). An unset --verbosity means WARNING: Orbax logs every checkpoint
    read and write at INFO, which buries the progress line and the program's output. It is set
    here because app.run turns an unset --verbosity into INFO right after this parser returns.
    """
    from absl import flags
    from absl import logging as absl_logging

    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err).removeprefix("ERROR:: ")  # absl prefixes flagfile errors
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        program = f"python -m {spec.name}" if spec else argv[0]
        print(f"error: {message}; see {program} --helpfull", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = absl_logging.WARNING
    return remaining
