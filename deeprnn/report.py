"""`python -m deeprnn.report --sweep_dir=DIR [--out=DIR]`: a sweep's table and plots.

Writes report.md and PNG plots to --out (default: DIR) and prints the Markdown: a table of the
final scores (mean ± spread over seeds, the best bold, differences the spread does not support
marked ≈); training_perplexity.png always, validation_perplexity.png when the runs have a
validation split, perplexity_vs_depth.png when --num_layers varies, perplexity_per_corpus.png
when the training corpus varies. deeprnn.run.sweep_results says what is read and how runs are
grouped.
"""

from __future__ import annotations

from absl import app, flags

from deeprnn.errors import UsageError, exit_on_usage_error, parse_flags_or_exit
from deeprnn.run.sweep_results import write_report

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no flags."""
    flags.DEFINE_string("sweep_dir", None, "Folder of a sweep's runs (local path or gs:// URL).")
    flags.DEFINE_string("out", None, "Where report.md and the PNG plots go (default: "
                        "--sweep_dir).")


def main(argv):
    del argv  # parse_flags_or_exit refuses positional arguments
    with exit_on_usage_error():
        if not FLAGS.sweep_dir:
            raise UsageError("--sweep_dir is required: the folder that holds the runs")
        print(write_report(FLAGS.sweep_dir, FLAGS.out), end="")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
