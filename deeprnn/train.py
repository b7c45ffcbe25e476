"""Train a deep RNN language model: `python -m deeprnn.train --flagfile=F --workdir=DIR`.

Flags in, one `train_and_evaluate(config, workdir)` call; the loop lives in `deeprnn.trainer`
so that tests and sweeps can call it in-process.
"""

from __future__ import annotations

import sys

from absl import app, flags

from deeprnn import flags as run_flags
from deeprnn.errors import UsageError

run_flags.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder for checkpoints and logs")
        config = run_flags.config_from_flags(FLAGS)
        from deeprnn.trainer import train_and_evaluate  # heavy imports after flag checks

        train_and_evaluate(config, FLAGS.workdir)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
