"""Generate text from a trained run: `python -m deeprnn.generate --workdir=DIR --prefix=...`."""

from __future__ import annotations

from absl import app, flags

from deeprnn.errors import UsageError, exit_on_usage_error, parse_flags_or_exit
from deeprnn.limits import GENERATE_MAX, SEED_MAX, check_at_most, check_seed
from deeprnn.training.trained_run import generate_text

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no flags."""
    flags.DEFINE_string("workdir", None, "Run folder; its newest complete checkpoint is used.")
    flags.DEFINE_string("prefix", "time traveller", "Text that warms the state up; generation "
                        "continues it (preprocessed with the run's rule).")
    flags.DEFINE_integer("length", 50, f"Characters to generate (1 to {GENERATE_MAX}).")
    flags.DEFINE_float("temperature", 0.0, "0: greedy (the book's predict); > 0: sample from "
                       "softmax(logits / temperature).")
    flags.DEFINE_integer("seed", 0, f"Sampling seed (temperature > 0), 0 to {SEED_MAX}.")


def main(argv):
    del argv
    with exit_on_usage_error():
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder of a trained run")
        check_at_most("length", FLAGS.length, GENERATE_MAX)
        check_seed(FLAGS.seed)
        print(generate_text(FLAGS.workdir, FLAGS.prefix, FLAGS.length, FLAGS.temperature,
                            FLAGS.seed))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
