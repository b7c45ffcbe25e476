"""Train a deep RNN language model: `python -m deeprnn.train --flagfile=F --workdir=DIR`.

Flags in, one `train_and_evaluate(config, workdir)` call; the loop lives in
`deeprnn.training.loop` so that tests and sweeps can call it in-process.

Exit status (see deeprnn.run.lifecycle): 0 finished; 1 a write failed (disk full, ...), resume
later; 2 bad input, one `error:` line and nothing written over; 75 stopped by SIGTERM/SIGINT
after checkpointing the last finished step: run the same command again to resume.
"""

from __future__ import annotations

import sys

from absl import app, flags

from deeprnn import config as run_config
from deeprnn.errors import UsageError, parse_flags_or_exit
from deeprnn.run import lifecycle

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder for checkpoints and logs")
        config = run_config.config_from_flags(FLAGS)
        # deferred: JAX, Flax and Orbax load (seconds) only once the flags are known good
        from deeprnn.training.loop import train_and_evaluate

        train_and_evaluate(config, FLAGS.workdir)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(lifecycle.EXIT_USAGE)
    except lifecycle.Preempted as stopped:
        print(str(stopped), file=sys.stderr)
        sys.exit(lifecycle.EXIT_PREEMPTED)
    except lifecycle.RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(lifecycle.EXIT_FAILED)
    except OSError as err:  # a log or summary write that failed (disk full, read-only, ...)
        print(f"error: {lifecycle.describe_os_error(err)}", file=sys.stderr)
        sys.exit(lifecycle.EXIT_FAILED)


if __name__ == "__main__":
    run_config.define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
