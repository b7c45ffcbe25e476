"""A trained run read back from its workdir, and what the programs do with it: generate text
(`python -m deeprnn.generate`) and score a corpus (`python -m deeprnn.evaluate`)."""

from __future__ import annotations

import dataclasses
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
from deeprnn.training.evaluation import evaluate_ids, scoring_config, single_device_eval_fn
from deeprnn.training.setup import initial_training_state, load_splits, model_config_for


@dataclasses.dataclass
class TrainedRun:
    config: RunConfig
    model_config: ModelConfig
    vocab: vocab.Vocab
    params: Any
    step: int


def load_trained_run(workdir: str) -> TrainedRun:
    """The newest complete checkpoint's parameters, flags and vocabulary."""
    if not epath.Path(workdir, "checkpoints").exists():
        raise UsageError(f"{workdir} holds no checkpoints; check --workdir, or train first with"
                         f" python -m deeprnn.train --workdir={workdir}")
    store = RunCheckpoints(f"{workdir}/checkpoints", max_to_keep=None, async_save=False)
    step = store.latest_complete_step()
    if step is None:
        raise UsageError(f"no complete checkpoint in {workdir}/checkpoints; train first with "
                         f"python -m deeprnn.train --workdir={workdir}")
    meta = store.read_meta(step)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    # The LSTM kernel is a choice of the machine that trained, not of the checkpoint (its
    # layout is the same for every kernel): a run trained with cuDNN is read back anywhere.
    config = RunConfig(**{k: v for k, v in meta["flags"].items()
                          if k in known and k != "lstm_kernel"}, lstm_kernel="auto")
    run_vocab = vocab.Vocab.from_json(meta["vocab"])
    model_config = model_config_for(config, run_vocab.size)
    _, _, _, state, carry = initial_training_state(config, model_config,
                                                   meta.get("num_train_steps", 1))
    restored, _ = store.restore(step, {"train": state, "carry": carry})
    params = restored["train"].params
    store.close()
    return TrainedRun(config, model_config, run_vocab, params, step)


def generate_text(workdir: str, prefix: str, length: int, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """The prefix (preprocessed with the run's rule) followed by `length` generated
    characters."""
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


def score_corpus(workdir: str, corpus: str | None, data_dir: str | None, split: str) -> dict:
    """A trained run's loss, perplexity, bits per character and <unk> rate on one split of a
    corpus (None: its own), with the run's vocabulary; `all` scores the whole text."""
    run = load_trained_run(workdir)
    config = scoring_config(run.config, corpus, data_dir, split)
    splits = load_splits(config, run.vocab)
    ids = splits.train if split == "all" else getattr(splits, split)
    result = evaluate_ids(single_device_eval_fn(run.model_config), run.model_config, run.params,
                          ids, num_steps=config.num_steps,
                          batch_size=min(config.eval_batch_size, max(len(ids) // 2, 1)))
    unk = float(np.mean(ids == 0)) if len(ids) else 0.0
    return {"workdir": workdir, "corpus": config.corpus, "split": split, "step": run.step,
            **result, "unk_rate": unk}
