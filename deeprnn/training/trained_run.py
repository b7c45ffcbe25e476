"""A trained run read back from its workdir, and what the programs do with it: generate text
(`python -m deeprnn.generate`) and score a corpus (`python -m deeprnn.evaluate`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import numpy as np
from etils import epath

from deeprnn.config import RunConfig
from deeprnn.data import vocab
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model
from deeprnn.model.config import ModelConfig
from deeprnn.model.generation import generate
from deeprnn.run.checkpoints import RunCheckpoints
from deeprnn.run.lifecycle import check_workdir_location
from deeprnn.training.evaluation import evaluate_on_devices, scoring_config
from deeprnn.training.progress import seed_record
from deeprnn.training.setup import (
    abstract_training_state,
    load_splits,
    make_devices,
    model_config_for,
    text_change,
)
from deeprnn.training.train_step import eval_step


@dataclasses.dataclass
class TrainedRun:
    config: RunConfig
    model_config: ModelConfig
    vocab: vocab.Vocab
    params: Any
    step: int
    meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata


def run_config_from(meta: dict) -> RunConfig:
    """The flags a checkpoint saved (flags added since it was written take their defaults).
    The LSTM kernel is a choice of the machine that trained, not of the checkpoint (its layout
    is the same for every kernel): a run trained with cuDNN is read back anywhere, as `auto`."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in meta["flags"].items()
                        if k in known and k != "lstm_kernel"}, lstm_kernel="auto")


def load_trained_run(workdir: str) -> TrainedRun:
    """The parameters, flags and vocabulary of the newest complete checkpoint that reads back
    whole (a damaged one is moved aside with a warning, and the one before it is used)."""
    check_workdir_location(workdir)
    if not epath.Path(workdir, "checkpoints").exists():
        raise UsageError(f"{workdir} holds no checkpoints; check --workdir, or train first with"
                         f" python -m deeprnn.train --workdir={workdir}")
    store = RunCheckpoints(f"{workdir}/checkpoints", max_to_keep=None, async_save=False)

    def target_for(meta: dict):
        config = run_config_from(meta)
        size = vocab.Vocab.from_json(meta["vocab"]).size
        state, carry = abstract_training_state(config, model_config_for(config, size))
        return {"train": state, "carry": carry}

    try:  # read-only: this program holds no lock, so it moves nothing aside
        found = store.restore_newest(target_for, move_damaged=False)
    finally:
        store.close()
    if found is None:
        raise UsageError(f"no complete checkpoint in {workdir}/checkpoints; train first with "
                         f"python -m deeprnn.train --workdir={workdir}")
    step, restored, meta = found
    config, run_vocab = run_config_from(meta), vocab.Vocab.from_json(meta["vocab"])
    return TrainedRun(config, model_config_for(config, run_vocab.size), run_vocab,
                      restored["train"].params, step, meta)


def generate_text(workdir: str, prefix: str, length: int, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The prefix (preprocessed with the run's rule) followed by `length` generated
    characters."""
    if length < 1:
        raise UsageError(f"--length must be at least 1, got {length}")
    if not temperature >= 0 or not math.isfinite(temperature):  # nan fails every comparison
        raise UsageError(f"--temperature must be a finite number, 0 (greedy) or more, got "
                         f"{temperature}")
    run = load_trained_run(workdir)
    clean = vocab.preprocess(prefix, run.config.preprocess)
    if not clean:
        raise UsageError(f"--prefix={prefix!r} is empty after {run.config.preprocess} "
                         "preprocessing; give some letters")
    ids = generate(run.model_config, run.params, run.vocab.encode(clean), length,
                   temperature=temperature, rng=jax.random.PRNGKey(seed))
    return clean + run.vocab.decode(ids)


def score_corpus(workdir: str, corpus: str | None, data_dir: str | None, split: str,
                 eval_batch_size: int | None = None) -> dict:
    """A trained run's loss, perplexity, bits per character and <unk> rate on one split of a
    corpus (None: its own), with the run's vocabulary; `all` scores the whole text. The split
    is cut with the run's --split fractions; it is read as `eval_batch_size` streams (default
    the run's, fewer for a text too short for them).

    Runs on every device of every process, as training does: on a TPU pod slice every worker
    runs this under jax.distributed (a TPU slice computes only with all its hosts taking part),
    and each process gets the same result.
    """
    run = load_trained_run(workdir)
    config = scoring_config(run.config, corpus, data_dir, split)
    splits = load_splits(config, run.vocab)
    # The run's own text, edited since: its "test split" is no longer text the run held out.
    change = text_change(run.meta, splits) if config.corpus == run.config.corpus else None
    if change:
        logging.warning("%s: these scores are not the run's held-out scores; restore the text "
                        "the run trained on to score those", change)
    ids = splits.train if split == "all" else getattr(splits, split)
    if len(ids) < 2:
        raise UsageError(f"the {split} split of {config.corpus} holds {len(ids)} tokens: the "
                         f"run cut each document with --split={config.split}; score "
                         "--split=train or --split=all, or another --corpus")
    wanted = config.eval_batch_size if eval_batch_size is None else eval_batch_size
    if wanted < 1:
        raise UsageError(f"--eval_batch_size must be at least 1, got {wanted}")
    devices = make_devices(run.config)
    # The streams asked for, fewer for a short text (each needs 2 tokens), and a whole number
    # per device.
    streams = min(wanted, len(ids) // 2) // devices.num_devices
    if streams < 1:
        raise UsageError(f"{config.corpus} has {len(ids)} tokens in its {split} split, too few to "
                         f"score on {devices.num_devices} devices (needs "
                         f"{2 * devices.num_devices}); score a larger split, e.g. --split=all")
    eval_fn = devices.compile_eval(functools.partial(eval_step,
                                                     apply_fn=build_model(run.model_config).apply))
    result = evaluate_on_devices(devices, eval_fn, run.model_config, run.params, ids,
                                 batch_size=streams * devices.num_devices,
                                 num_steps=config.num_steps)
    unk = float(np.mean(ids == vocab.UNK_ID))
    return {"workdir": workdir, "corpus": config.corpus, "split": split, "step": run.step,
            **seeds_summary(result), "unk_rate": unk, "text_changed_since_training": bool(change)}


def seeds_summary(result: dict | list[dict]) -> dict:
    """A --num_seeds run's per-seed scores (a list) as their mean, `<key>_std` and `seeds`
    (progress.seed_record's rule); one seed's scores as they are."""
    if not isinstance(result, list):
        return result
    record = seed_record("score", result)
    return {**{key.removeprefix("score/"): value for key, value in record.items()
               if key.startswith("score/")}, "seeds": result}
