"""Held-out evaluation, and `python -m deeprnn.evaluate --workdir=DIR --corpus=SPEC`.

The CLI scores a trained run on any corpus with the run's own vocabulary (characters it never
saw become <unk>, and the <unk> rate is reported), e.g. a book by an author left out of
training.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
from absl import app, flags

from deeprnn import batches, models, steps
from deeprnn.errors import UsageError, exit_on_usage_error, parse_flags_or_exit


@functools.lru_cache(maxsize=16)
def single_device_eval_fn(model_config: models.ModelConfig):
    model = models.build_model(model_config)
    return jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply))


def evaluate_ids(step_fn, model_config, params, ids: np.ndarray, *, batch_size: int,
                 num_steps: int, rows: tuple[int, int] | None = None,
                 carry=None) -> dict[str, float] | list[dict[str, float]]:
    """Loss, perplexity and bits per character over a whole split, read exactly once.

    The split runs as `batch_size` contiguous streams whose state carries from one window to
    the next, so every target token is scored with its full left context in its stream.
    `step_fn` is a compiled eval step; `rows` this process's streams (multi-host); `carry` its
    initial state placed on the devices. Stacked seeds' params give a list, one dict a seed.
    """
    start, stop = rows or (0, batch_size)
    if carry is None:
        carry = models.init_carry(model_config, stop - start)
    loss_sum, tokens = 0.0, 0.0
    for x, y, mask in batches.eval_batches(ids, batch_size, num_steps):
        carry, metrics = step_fn(params, x[start:stop], y[start:stop], mask[start:stop], carry)
        loss_sum, tokens = loss_sum + metrics["loss_sum"], tokens + metrics["tokens"]
    loss_sum, tokens = (np.asarray(a, float) for a in jax.device_get((loss_sum, tokens)))
    if loss_sum.ndim:  # one score per seed (--num_seeds)
        return [{**steps.summarize(float(ls), float(t)), "tokens": float(t)}
                for ls, t in zip(loss_sum, tokens, strict=True)]
    return {**steps.summarize(float(loss_sum), float(tokens)), "tokens": float(tokens)}


def scoring_config(run_config, corpus: str | None, data_dir: str | None, split: str):
    """The run's data flags for scoring `corpus` (None: its own). `all` is the whole text; the
    run's --max_tokens, a budget for its own training text, does not cut another corpus."""
    overrides = {"corpus": corpus or run_config.corpus,
                 "data_dir": data_dir or run_config.data_dir}
    if overrides["corpus"] != run_config.corpus:
        overrides["max_tokens"] = 0
    if split == "all":
        overrides.update(split="1,0,0", max_tokens=0)
    return dataclasses.replace(run_config, **overrides)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no flags."""
    flags.DEFINE_string("workdir", None, "Run folder of a trained run (its newest checkpoint).")
    flags.DEFINE_string("corpus", None, "Corpus spec to score (default: the run's own corpus; "
                        "another corpus is read whole, not cut to the run's --max_tokens).")
    flags.DEFINE_string("data_dir", None, "Folder of raw <name>.txt files (default: the run's, "
                        "or $DEEPRNN_DATA_DIR).")
    flags.DEFINE_enum("split", "test", ["train", "validation", "test", "all"],
                      "Which part of each document to score; `all` scores the whole text.")


def main(argv):
    del argv
    from deeprnn.runs import load_trained_run
    from deeprnn.trainer import load_splits

    with exit_on_usage_error():
        if not FLAGS.workdir:
            raise UsageError("--workdir is required: the folder of a trained run")
        run = load_trained_run(FLAGS.workdir)
        config = scoring_config(run.config, FLAGS.corpus, FLAGS.data_dir, FLAGS.split)
        splits = load_splits(config, run.vocab)
        ids = splits.train if FLAGS.split == "all" else getattr(splits, FLAGS.split)
        result = evaluate_ids(single_device_eval_fn(run.model_config), run.model_config,
                              run.params, ids, num_steps=config.num_steps,
                              batch_size=min(config.eval_batch_size, max(len(ids) // 2, 1)))
        unk = float(np.mean(ids == 0)) if len(ids) else 0.0
        print(json.dumps({"workdir": FLAGS.workdir, "corpus": config.corpus,
                          "split": FLAGS.split, "step": run.step, **result,
                          "unk_rate": unk}, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
