"""Score a trained run on a corpus: `python -m deeprnn.evaluate --workdir=DIR --corpus=SPEC`.

The run's own vocabulary scores the text (characters it never saw become <unk>, and the <unk>
rate is reported), e.g. a book by an author left out of training. Prints one JSON object, and
with --output also writes it there (a local path or gs://), whole.

On a TPU pod slice, run it on every worker with --multihost, as training runs: the processes
score the text together, and process 0 alone prints and writes the result.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from deeprnn.errors import UsageError, exit_on_usage_error, parse_flags_or_exit
from deeprnn.limits import check_multihost
from deeprnn.run.outputs import check_output_file

FLAGS = flags.FLAGS
UNK_WARNING_RATE = 0.25  # a quarter unseen: the score is more about <unk> than the model


def define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no flags."""
    flags.DEFINE_string("workdir", None, "Run folder of a trained run (its newest checkpoint).")
    flags.DEFINE_string("corpus", None, "Corpus spec to score (default: the run's own corpus; "
                        "another corpus is read whole, not cut to the run's --max_tokens).")
    flags.DEFINE_string("data_dir", None, "Folder of raw <name>.txt files (default: the run's, "
                        "or $DEEPRNN_DATA_DIR).")
    flags.DEFINE_enum("split", "test", ["train", "validation", "test", "all"],
                      "Which part of each document to score, cut with the run's --split "
                      "fractions (a run trained with 1,0,0 has no validation or test part); "
                      "`all` scores the whole text.")
    flags.DEFINE_integer("eval_batch_size", None, "Streams the text is read as (default: the "
                         "run's --eval_batch_size; fewer when the text is too short).")
    flags.DEFINE_string("output", None, "Also write the JSON result to this file (local or "
                        "gs://), replacing it whole; process 0 alone writes.")
    flags.DEFINE_boolean("multihost", False, "Call jax.distributed.initialize() first and score "
                         "on every device of every host (TPU pod slices: run it on every "
                         "worker; arguments from the environment).")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for --multihost "
                        "outside Cloud TPU.")
    flags.DEFINE_integer("num_processes", 0, "Processes for --multihost outside Cloud TPU.")
    flags.DEFINE_integer("process_id", -1, "This process's index for --multihost outside "
                         "Cloud TPU.")


def main(argv):
    del argv
    with exit_on_usage_error():
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder of a trained run")
        check_multihost(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes,
                        FLAGS.process_id)
        if FLAGS.output:  # before the scoring, which a bad path would only fail after
            check_output_file(FLAGS.output, "output")
        # deferred: JAX loads (seconds) only once the flags are known good
        import jax
        from etils import epath

        # deferred: these load JAX, Flax and Orbax
        from deeprnn.run.writers import write_text_whole
        from deeprnn.training.parallel import start_multihost
        from deeprnn.training.trained_run import score_corpus

        start_multihost(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes,
                        FLAGS.process_id)
        result = score_corpus(FLAGS.workdir, FLAGS.corpus, FLAGS.data_dir, FLAGS.split,
                              FLAGS.eval_batch_size)
        if jax.process_index() != 0:  # one result, one writer: the others computed the same
            return
        text = json.dumps(result, indent=1)
        print(text)
        if FLAGS.output:
            path = epath.Path(FLAGS.output)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_whole(path, text + "\n")
        if result["unk_rate"] > UNK_WARNING_RATE:
            print(f"warning: {result['unk_rate']:.0%} of this text is characters the run's "
                  "vocabulary lacks (<unk>), so its perplexity says little about the model; "
                  "score a text written in the run's alphabet", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
