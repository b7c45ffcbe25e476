"""Loading a trained run back from its workdir (for generation and evaluation)."""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from deeprnn import models, vocab
from deeprnn.checkpoints import RunCheckpoints
from deeprnn.errors import UsageError
from deeprnn.flags import RunConfig


@dataclasses.dataclass
class TrainedRun:
    config: RunConfig
    model_config: models.ModelConfig
    vocab: vocab.Vocab
    params: Any
    step: int


def load_trained_run(workdir: str) -> TrainedRun:
    """The newest complete checkpoint's parameters, flags and vocabulary."""
    from deeprnn.trainer import initial_training_state, model_config_for

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
    config = RunConfig(**{k: v for k, v in meta["flags"].items() if k in known})
    run_vocab = vocab.Vocab.from_json(meta["vocab"])
    model_config = model_config_for(config, run_vocab.size)
    _, _, _, state, carry = initial_training_state(config, model_config,
                                                   meta.get("num_train_steps", 1))
    restored, _ = store.restore(step, {"train": state, "carry": carry})
    params = restored["train"].params
    store.close()
    return TrainedRun(config, model_config, run_vocab, params, step)
