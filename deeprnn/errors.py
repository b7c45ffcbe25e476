"""The one exception type that entry points turn into a one-line message and exit status 2."""

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
