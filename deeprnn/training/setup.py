"""What every program needs to rebuild a run from its flags: the text, the model and a fresh
training state, the devices and samplers, and the schedule of evaluations, samples and saves.

The training loop builds a new or resumed run from these; `trained_run` rebuilds a finished
one for generation and evaluation from the flags its checkpoint saved.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from deeprnn.config import RunConfig, model_flag_differences
from deeprnn.data import samplers, sources, vocab
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.stack import init_carry
from deeprnn.run.summary import summary_if_any
from deeprnn.training import hosts, seeds
from deeprnn.training.optimizer import make_learning_rate, make_optimizer
from deeprnn.training.parallel import DataParallel
from deeprnn.training.train_step import TrainState


def model_config_for(config: RunConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, num_hiddens=config.num_hiddens, num_layers=config.num_layers,
        cell=config.cell, activation=config.activation, gru_variant=config.gru_variant,
        dropout=config.dropout, residual=config.residual, layer_norm=config.layer_norm,
        impl=config.impl, compute_dtype=config.compute_dtype,
        # Seeds are vmapped and cuDNN's binding has no vmap rule, so auto stays off it.
        lstm_kernel="fused" if config.num_seeds > 1 and config.lstm_kernel == "auto"
        else config.lstm_kernel)


def load_splits(config: RunConfig, saved_vocab: vocab.Vocab | None = None) -> vocab.Splits:
    """The corpus's splits; on a multi-host run every process loads its own copy and all check
    that they hold the same text (deeprnn.training.hosts)."""
    documents = hosts.load_on_every_host(
        sources.parse_spec(config.corpus),
        lambda: sources.load_documents(config.corpus, config.data_dir, config.tfds_data_dir))
    return vocab.build_splits(documents, config.preprocess, config.split_fractions(),
                              max_tokens=config.max_tokens or None, vocab=saved_vocab)


def initial_training_state(config: RunConfig, model_config: ModelConfig, num_train_steps: int):
    """The model, optimizer, learning-rate schedule, fresh TrainState and zero carry.

    With --num_seeds=K, the state and carry of seeds seed..seed+K-1 stacked on a leading axis.
    """
    model = build_model(model_config)
    lr_fn = make_learning_rate(config.lr, config.lr_schedule, num_train_steps,
                               config.warmup_steps)
    tx = make_optimizer(config.optimizer, lr_fn, config.clip_norm,
                        skip_nonfinite=config.nan_policy == "skip")

    def fresh(seed):
        init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
        params = init_params(model_config, init_key)
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                          opt_state=tx.init(params), rng=dropout_key)

    carry = init_carry(model_config, config.batch_size)
    if config.num_seeds == 1:
        state = fresh(config.seed)
    else:
        state = seeds.stack([fresh(s) for s in seeds.seed_values(config.seed,
                                                                 config.num_seeds)])
        carry = seeds.stack([carry] * config.num_seeds)
    # Distinct buffers per leaf: the train step donates the carry, and XLA refuses to donate
    # one buffer twice (init_carry may share one zeros array between c and h).
    carry = jax.tree.map(lambda a: jnp.array(a, copy=True), carry)
    return model, tx, lr_fn, state, carry


def make_devices(config: RunConfig) -> DataParallel | seeds.SeedStack:
    """Where the steps run: every device (data parallel), or K stacked seeds on one device."""
    if config.num_seeds == 1:
        return DataParallel(config.parallel)
    return seeds.SeedStack(config.num_seeds)


def make_samplers(config: RunConfig, train_ids, rows) -> list:
    """One sampler per seed (each its own data order), building this process's `rows`."""
    return [samplers.make_sampler(config.sampler, train_ids, config.batch_size,
                                  config.num_steps, seed, rows=rows)
            for seed in seeds.seed_values(config.seed, config.num_seeds)]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a run trains, evaluates, samples and saves, in optimizer steps."""
    num_train_steps: int
    eval_every: int
    sample_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, config: RunConfig, steps_per_epoch: int) -> Schedule:
        """Defaults: evaluation once an epoch, samples with it, saves every 500 steps or at
        each evaluation if rarer; all rounded up to whole compiled calls."""
        per_call = config.steps_per_call
        epoch = -(-steps_per_epoch // per_call) * per_call
        eval_every = config.eval_every or epoch
        sample_every = config.sample_every or eval_every
        checkpoint_every = (config.checkpoint_every
                            or -(-max(eval_every, 500) // per_call) * per_call)
        num_train_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
        return cls(num_train_steps, eval_every, sample_every, checkpoint_every)


def abstract_training_state(config: RunConfig, model_config: ModelConfig):
    """The shapes, dtypes and placement of a fresh state and carry, allocating nothing: what a
    checkpoint is restored into, and what the memory check sizes."""
    state, carry = jax.eval_shape(lambda: initial_training_state(config, model_config, 1)[3:])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        (state, carry))


def resume_target(config: RunConfig, workdir: str):
    """target_for(meta) for RunCheckpoints.restore_newest: refuses a checkpoint made with other
    model or data flags, and gives the structure it was saved in (its own --nan_policy's)."""
    def target_for(meta: dict):
        differ = model_flag_differences(meta["flags"], config)
        if differ:
            raise UsageError(f"{workdir} holds a checkpoint made with other flags: "
                             f"{'; '.join(differ)}; use another --workdir or the same flags")
        saved = dataclasses.replace(config, nan_policy=saved_nan_policy(meta, config))
        vocab_size = vocab.Vocab.from_json(meta["vocab"]).size
        state, carry = abstract_training_state(saved, model_config_for(saved, vocab_size))
        return {"train": state, "carry": carry}
    return target_for


def refuse_another_runs_logs(config: RunConfig, workdir: str) -> None:
    """A workdir with no checkpoint to resume may hold the logs of a start that crashed before
    its first save: this run starts over and drops them. But logs whose summary.json names
    other flags are another run's, and are refused rather than written over."""
    summary = summary_if_any(workdir)
    flags = summary.get("flags") if isinstance(summary, dict) else None
    differ = model_flag_differences(flags, config) if isinstance(flags, dict) else []
    if differ:
        raise UsageError(f"{workdir} holds the logs of another run and no checkpoint to resume "
                         f"(its summary.json has {'; '.join(differ)}); use another --workdir, "
                         f"or delete its files to start this run there")


def sample_prefix_ids(config: RunConfig, run_vocab: vocab.Vocab):
    """The ids of --sample_prefix as the run's text is preprocessed; refused when nothing is
    left of it (checked before training: the first sample would fail after it)."""
    ids = run_vocab.encode(vocab.preprocess(config.sample_prefix, config.preprocess))
    if not len(ids):
        raise UsageError(f"--sample_prefix={config.sample_prefix!r} is empty after "
                         f"--preprocess={config.preprocess}; give a prefix with characters it "
                         f"keeps, e.g. --sample_prefix='time traveller'")
    return ids


def saved_nan_policy(meta: dict, config: RunConfig) -> str:
    return meta["flags"].get("nan_policy", config.nan_policy)


def adopt_nan_policy(restored: TrainState, fresh: TrainState, saved: str,
                     policy: str) -> TrainState:
    """The restored state with its optimizer state in this run's --nan_policy form: `skip`
    wraps SGD's or Adam's state in optax.apply_if_finite's (counts from zero), `stop` unwraps
    it; so a run stopped by a non-finite loss resumes under --nan_policy=skip, as its error
    advises. `fresh` gives the wrapper's structure."""
    if saved == policy:
        return restored
    if policy == "skip":
        return restored.replace(opt_state=fresh.opt_state._replace(
            inner_state=restored.opt_state))
    return restored.replace(opt_state=restored.opt_state.inner_state)


def check_same_text(meta: dict, splits: vocab.Splits) -> None:
    """Refuses a resume whose documents changed since the checkpoint (new content under the
    same file: path or mirror name): the run would go on training on another text."""
    change = text_change(meta, splits)
    if change:
        raise UsageError(f"{change}: the run trained on other text; restore that file or use "
                         "another --workdir")


def text_change(meta: dict, splits: vocab.Splits) -> str | None:
    """How the first document that differs from the checkpoint's record differs, or None."""
    # The text's own digest; checkpoints from before it existed recorded the source bytes'.
    saved = {d["name"]: (d.get("text_sha256"), d["sha256"]) for d in meta.get("documents", ())}
    for document in splits.documents:
        text_digest, source_digest = saved.get(document["name"], (None, None))
        key = "text_sha256" if text_digest is not None else "sha256"
        before = text_digest if text_digest is not None else source_digest
        if before is not None and before != document[key]:
            return (f"{document['name']} changed since the checkpoint (sha256 {before[:12]}..., "
                    f"now {document[key][:12]}...)")
    return None


def warn_if_eval_batch_changed(meta: dict, config: RunConfig) -> None:
    before = meta["flags"].get("eval_batch_size", config.eval_batch_size)
    if before != config.eval_batch_size:
        logging.warning("--eval_batch_size is %d, the checkpoint's %d: validation from here on "
                        "reads %d streams, so its scores (and which step is best) compare "
                        "across the change only roughly", config.eval_batch_size, before,
                        config.eval_batch_size)


def check_held_out(config: RunConfig, splits: vocab.Splits) -> None:
    # Evaluation would find this only at the first eval step, after training and saving.
    for name in ("validation", "test"):
        size = getattr(splits, name).size
        if 0 < size < 2 * config.eval_batch_size:
            lower = "lower --eval_batch_size or " if config.eval_batch_size > 1 else ""
            raise UsageError(f"the {name} split has {size} tokens, too few for "
                             f"--eval_batch_size={config.eval_batch_size} (needs "
                             f"{2 * config.eval_batch_size}); {lower}give the split a larger "
                             "fraction with --split")
