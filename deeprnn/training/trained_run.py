"""A trained run read back from its workdir, and what the programs do with it: generate text
(`python -m deeprnn.generate`) and score a corpus (`python -m deeprnn.evaluate`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from etils import epath

from deeprnn.config import RunConfig
from deeprnn.data import vocab
from deeprnn.errors import UsageError
from deeprnn.model.config import ModelConfig
from deeprnn.model.generation import generate
from deeprnn.run.checkpoints import RunCheckpoints
from deeprnn.run.lifecycle import check_workdir_location
from deeprnn.training.evaluation import evaluate_ids, scoring_config, single_device_eval_fn
from deeprnn.training.setup import abstract_training_state, load_splits, model_config_for


@dataclasses.dataclass
class TrainedRun:
    config: RunConfig
    model_config: ModelConfig
    vocab: vocab.Vocab
    params: Any
    step: int


def run_config_from(meta: dict) -> RunConfig:
    """The flags a checkpoint saved (flags added since it was written take their defaults)."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in meta["flags"].items() if k in known})


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

    found = store.restore_newest(target_for)
    store.close()
    if found is None:
        raise UsageError(f"no complete checkpoint in {workdir}/checkpoints; train first with "
                         f"python -m deeprnn.train --workdir={workdir}")
    step, restored, meta = found
    config, run_vocab = run_config_from(meta), vocab.Vocab.from_json(meta["vocab"])
    return TrainedRun(config, model_config_for(config, run_vocab.size), run_vocab,
                      restored["train"].params, step)


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
    the run's, fewer for a text too short for them)."""
    run = load_trained_run(workdir)
    config = scoring_config(run.config, corpus, data_dir, split)
    splits = load_splits(config, run.vocab)
    ids = splits.train if split == "all" else getattr(splits, split)
    if len(ids) < 2:
        raise UsageError(f"the {split} split of {config.corpus} holds {len(ids)} tokens: the "
                         f"run cut each document with --split={config.split}; score "
                         "--split=train or --split=all, or another --corpus")
    wanted = config.eval_batch_size if eval_batch_size is None else eval_batch_size
    if wanted < 1:
        raise UsageError(f"--eval_batch_size must be at least 1, got {wanted}")
    result = evaluate_ids(single_device_eval_fn(run.model_config), run.model_config, run.params,
                          ids, num_steps=config.num_steps,
                          batch_size=min(wanted, len(ids) // 2))
    unk = float(np.mean(ids == vocab.UNK_ID))
    return {"workdir": workdir, "corpus": config.corpus, "split": split, "step": run.step,
            **result, "unk_rate": unk}
