"""Train a deep RNN language model: `python -m deeprnn.train --flagfile=F --workdir=DIR`.

Flags in, one `train_and_evaluate(config, workdir)` call; the loop lives in
`deeprnn.training.loop` so that tests and sweeps can call it in-process.

Exit status (see deeprnn.run.lifecycle): 0 finished; 1 a write failed (disk full, ...), resume
later; 2 bad input, one `error:` line and nothing written over; 75 stopped by SIGTERM/SIGINT
after checkpointing the last finished step: run the same command again to resume; 130 stopped
at once by a second Ctrl-C.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from deeprnn import config as run_config
from deeprnn.errors import UsageError, parse_flags_or_exit
from deeprnn.run import lifecycle
from deeprnn.run.library_log import library_log, mention

FLAGS = flags.FLAGS


def main(argv):
    del argv  # parse_flags_or_exit refuses positional arguments
    try:
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder for checkpoints and logs")
        config = run_config.config_from_flags(FLAGS)
        lifecycle.check_workdir_location(FLAGS.workdir)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(lifecycle.EXIT_USAGE)
    # deferred: JAX, Flax and Orbax load (seconds) only once the flags are known good
    from deeprnn.training.loop import train_and_evaluate

    with library_log(FLAGS.workdir) as log:
        try:
            train_and_evaluate(config, FLAGS.workdir)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(lifecycle.EXIT_USAGE)
        except lifecycle.Preempted as stopped:
            print(str(stopped), file=sys.stderr)
            sys.exit(lifecycle.EXIT_PREEMPTED)
        except KeyboardInterrupt:  # a second Ctrl-C: the first one's orderly stop was cut short
            _exit_now(lifecycle.EXIT_INTERRUPTED, "stopped at once by a second Ctrl-C; the "
                      "newest complete checkpoint is intact: run the same command to resume")
        except (lifecycle.RunFailed, OSError) as err:
            if lifecycle.interrupted(err):
                _exit_now(lifecycle.EXIT_INTERRUPTED, "stopped at once by a second Ctrl-C "
                          "while saving; the newest complete checkpoint is intact: run the "
                          "same command to resume")
            message = err if isinstance(err, lifecycle.RunFailed) else (
                lifecycle.describe_os_error(err))
            _exit_now(lifecycle.EXIT_FAILED, f"error: {message}{mention(log)}")


def _exit_now(status: int, line: str) -> None:
    """Prints the line and ends the process without waiting for Orbax's background threads:
    after a failed write they wait up to 300 s for signals that never come (measured with an
    unwritable checkpoint folder), and nothing is left to save."""
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


if __name__ == "__main__":
    run_config.define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
