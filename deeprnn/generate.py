"""Generate text from a trained run: `python -m deeprnn.generate --workdir=DIR --prefix=...`."""

from __future__ import annotations

import jax
from absl import app, flags

from deeprnn.errors import UsageError, exit_on_usage_error, parse_flags_or_exit

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no flags."""
    flags.DEFINE_string("workdir", None, "Run folder; its newest complete checkpoint is used.")
    flags.DEFINE_string("prefix", "time traveller", "Text that warms the state up; generation "
                        "continues it (preprocessed with the run's rule).")
    flags.DEFINE_integer("length", 50, "Characters to generate.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy (the book's predict); > 0: sample from "
                       "softmax(logits / temperature).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (temperature > 0).")


def generate_text(workdir: str, prefix: str, length: int, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The prefix followed by `length` generated characters."""
    from deeprnn import vocab
    from deeprnn.generation import generate
    from deeprnn.runs import load_trained_run

    if length < 1:
        raise UsageError(f"--length must be at least 1, got {length}")
    if temperature < 0:
        raise UsageError(f"--temperature must be 0 or more, got {temperature}")
    run = load_trained_run(workdir)
    clean = vocab.preprocess(prefix, run.config.preprocess)
    if not clean:
        raise UsageError(f"--prefix={prefix!r} is empty after {run.config.preprocess} "
                         "preprocessing; give some letters")
    ids = generate(run.model_config, run.params, run.vocab.encode(clean), length,
                   temperature=temperature, rng=jax.random.PRNGKey(seed))
    return clean + run.vocab.decode(ids)


def main(argv):
    del argv
    with exit_on_usage_error():
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder of a trained run")
        print(generate_text(FLAGS.workdir, FLAGS.prefix, FLAGS.length, FLAGS.temperature,
                            FLAGS.seed))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
