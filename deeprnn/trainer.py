"""The training loop behind `python -m deeprnn.train`: data, model, steps, logs, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn import batches, corpora, models, steps, vocab
from deeprnn.checkpoints import RunCheckpoints
from deeprnn.errors import UsageError
from deeprnn.evaluate import evaluate_ids
from deeprnn.flags import RunConfig, model_flag_differences, profile_steps
from deeprnn.generation import generate
from deeprnn.jax_setup import enable_compilation_cache
from deeprnn.parallel import DataParallel, start_multihost
from deeprnn.run_info import run_metadata
from deeprnn.writers import ProgressLine, RunWriter, write_summary


def model_config_for(config: RunConfig, vocab_size: int) -> models.ModelConfig:
    return models.ModelConfig(
        vocab_size=vocab_size, num_hiddens=config.num_hiddens, num_layers=config.num_layers,
        cell=config.cell, activation=config.activation, gru_variant=config.gru_variant,
        dropout=config.dropout, residual=config.residual, layer_norm=config.layer_norm,
        impl=config.impl, compute_dtype=config.compute_dtype)


def load_splits(config: RunConfig, saved_vocab: vocab.Vocab | None = None) -> vocab.Splits:
    documents = corpora.load_documents(config.corpus, config.data_dir, config.tfds_data_dir)
    return vocab.build_splits(documents, config.preprocess, config.split_fractions(),
                              max_tokens=config.max_tokens or None, vocab=saved_vocab)


def initial_training_state(config: RunConfig, model_config: models.ModelConfig,
                           num_train_steps: int):
    """The model, optimizer, learning-rate schedule, fresh TrainState and zero carry."""
    model = models.build_model(model_config)
    lr_fn = steps.make_learning_rate(config.lr, config.lr_schedule, num_train_steps,
                                     config.warmup_steps)
    tx = steps.make_optimizer(config.optimizer, lr_fn, config.clip_norm,
                              skip_nonfinite=config.nan_policy == "skip")
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = models.init_params(model_config, init_key)
    state = steps.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                             opt_state=tx.init(params), rng=dropout_key)
    # Distinct buffers per leaf: the train step donates the carry, and XLA refuses to donate
    # one buffer twice (init_carry may share one zeros array between c and h).
    carry = jax.tree.map(lambda a: jnp.array(a, copy=True),
                         models.init_carry(model_config, config.batch_size))
    return model, tx, lr_fn, state, carry


class NonFiniteError(UsageError):
    """A NaN or inf loss/gradient under --nan_policy=stop."""


@dataclasses.dataclass
class _Progress:
    """What the loop accumulates between logs, saved in checkpoints so a resume is exact."""
    loss_sum: float = 0.0
    tokens: float = 0.0
    best_validation: float = math.inf
    best_step: int = -1
    skipped_updates: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)
    last_validation: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(config: RunConfig, workdir: str) -> dict:
    """Trains, evaluates and checkpoints one run in `workdir`; returns the run's summary."""
    enable_compilation_cache()
    start_multihost(config.multihost, config.coordinator_address, config.num_processes,
                    config.process_id)
    is_main = jax.process_index() == 0
    start_time = time.time()
    store = RunCheckpoints(f"{workdir}/checkpoints", max_to_keep=config.max_to_keep)
    resume_step = store.latest_complete_step()
    saved_meta = store.read_meta(resume_step) if resume_step is not None else None
    if saved_meta is not None:
        differ = model_flag_differences(saved_meta["flags"], config)
        if differ:
            raise UsageError(f"{workdir} holds a checkpoint made with other flags: "
                             f"{'; '.join(differ)}; use another --workdir or the same flags")
    saved_vocab = vocab.Vocab.from_json(saved_meta["vocab"]) if saved_meta else None
    splits = load_splits(config, saved_vocab)
    devices = DataParallel(config.parallel)
    sampler = batches.make_sampler(config.sampler, splits.train, config.batch_size,
                                   config.num_steps, config.seed,
                                   rows=devices.rows(config.batch_size))
    eval_rows = devices.rows(config.eval_batch_size)
    num_train_steps = config.num_train_steps or config.num_epochs * sampler.steps_per_epoch
    eval_every = config.eval_every or sampler.steps_per_epoch
    sample_every = config.sample_every or eval_every
    checkpoint_every = config.checkpoint_every or max(eval_every, 500)

    model_config = model_config_for(config, splits.vocab.size)
    model, tx, lr_fn, state, carry = initial_training_state(config, model_config,
                                                            num_train_steps)
    progress = _Progress()
    if resume_step is not None:
        restored, meta = store.restore(resume_step, {"train": state, "carry": carry})
        state, carry = restored["train"], restored["carry"]
        progress = _Progress(**meta["progress"])
        logging.info("resumed from step %d in %s", resume_step, workdir)
    start_step = int(state.step)
    state, carry = devices.replicate(state), devices.shard_rows(carry)

    def logical_params():
        return devices.logical(state, carry)[0].params

    # resume_step=-1 clears logs left by a run that crashed before its first checkpoint.
    writer = RunWriter(workdir, enabled=is_main,
                       resume_step=start_step if resume_step is not None else -1)
    meta_info = run_metadata(config, model_config, logical_params(), splits, num_train_steps)
    writer.hparams({k: v for k, v in dataclasses.asdict(config).items() if v is not None},
                   ["validation/perplexity", "validation/bits_per_char", "test/perplexity"])

    run_steps = devices.compile_train(
        functools.partial(steps.train_steps, apply_fn=model.apply, tx=tx))
    eval_fn = devices.compile_eval(functools.partial(steps.eval_step, apply_fn=model.apply))

    def evaluate(params, ids):
        """Scores a split with logical (single-device) params."""
        eval_carry = devices.shard_rows(models.init_carry(model_config,
                                                          eval_rows[1] - eval_rows[0]))
        return evaluate_ids(eval_fn, model_config, devices.replicate(params), ids,
                            rows=eval_rows, carry=eval_carry, batch_size=config.eval_batch_size,
                            num_steps=config.num_steps)
    prefix_ids = splits.vocab.encode(vocab.preprocess(config.sample_prefix, config.preprocess))

    def checkpoint(step, wait=False):
        writer.flush()  # logs up to this step are durable before the checkpoint that covers them
        meta = {"flags": dataclasses.asdict(config), "vocab": splits.vocab.to_json(),
                "progress": dataclasses.asdict(progress), "num_train_steps": num_train_steps}
        logical_state, logical_carry = devices.logical(state, carry)
        store.save(step, {"train": logical_state, "carry": logical_carry}, meta, wait=wait)

    def sample(step):
        text = splits.vocab.decode(generate(model_config, logical_params(), prefix_ids,
                                            config.sample_length))
        writer.texts(step, {f"samples/{config.sample_prefix}": config.sample_prefix + text})
        return text

    profile = profile_steps(config)
    line = ProgressLine(num_train_steps) if is_main else None
    tokens_per_step = config.batch_size * config.num_steps
    interval_start, interval_tokens, train_time = time.time(), 0, 0.0
    step, pending = start_step, []
    while step < num_train_steps:
        if profile and step == profile[0]:
            jax.profiler.start_trace(f"{workdir}/profile")
        xs, ys = sampler.batch(step)
        resets = np.asarray([sampler.resets_state(step)])
        state, carry, metrics = run_steps(state, xs[None], ys[None], carry, resets)
        step += 1
        if profile and step == profile[1] + 1:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        interval_tokens += tokens_per_step
        pending.append(metrics)  # device arrays: no host sync until the next log
        if not (step % config.log_every == 0 or step % eval_every == 0
                or step == num_train_steps):
            continue
        fetched, pending = jax.device_get(pending), []
        first = step - len(fetched)
        for offset, m in enumerate(fetched):
            _check_finite(config, first + offset + 1, m, store, progress)
            progress.loss_sum += float(np.sum(m["loss_sum"]))
            progress.tokens += float(np.sum(m["tokens"]))
        elapsed = time.time() - interval_start
        train_time += elapsed
        record = {"train/grad_norm": float(np.asarray(fetched[-1]["grad_norm"])[-1]),
                  "train/learning_rate": float(lr_fn(step - 1)),
                  "train/tokens_per_sec": interval_tokens / max(elapsed, 1e-9)}
        if step % config.log_every == 0 or step == num_train_steps:
            summary = steps.summarize(progress.loss_sum, progress.tokens)
            record.update({f"train/{k}": v for k, v in summary.items()})
            progress.last_train = summary
            progress.loss_sum = progress.tokens = 0.0
        if (step % eval_every == 0 or step == num_train_steps) and splits.validation.size:
            val = evaluate(logical_params(), splits.validation)
            record.update({f"validation/{k}": v for k, v in val.items()})
            progress.last_validation = val
            if val["perplexity"] < progress.best_validation:
                progress.best_validation, progress.best_step = val["perplexity"], step
                _save_best(workdir, logical_params(), step)
        writer.scalars(step, record)
        if step % sample_every == 0 or step == num_train_steps:
            sample(step)
        if step % checkpoint_every == 0 or step == num_train_steps:
            checkpoint(step, wait=step == num_train_steps)
        if line:
            line.update(step, record)
        interval_start, interval_tokens = time.time(), 0
        meta_info.update(steps_done=step, wall_time_s=time.time() - start_time,
                         tokens_per_sec=(step - start_step) * tokens_per_step / max(train_time,
                                                                                    1e-9))
        if is_main and step % eval_every == 0:
            write_summary(workdir, _summary(meta_info, progress))
    if line:
        line.done()

    final = _final_evaluation(workdir, evaluate, logical_params(), splits, writer, step)
    meta_info.update(steps_done=step, wall_time_s=time.time() - start_time)
    summary = _summary(meta_info, progress, final)
    if is_main:
        write_summary(workdir, summary)
        _print_book_lines(config, model_config, logical_params(), splits, progress, meta_info)
    writer.close()
    store.close()
    return summary


def _check_finite(config, step, metrics, store, progress):
    values = {"loss": float(np.sum(metrics["loss_sum"])),
              "grad_norm": float(np.max(metrics["grad_norm"]))}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if not bad:
        return
    if config.nan_policy == "skip":
        progress.skipped_updates += 1
        logging.warning("step %d: non-finite %s, update skipped", step, ", ".join(bad))
        return
    last = store.latest_complete_step()
    raise NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step}; last good checkpoint: "
        f"{'step ' + str(last) if last is not None else 'none'}; lower --lr or pass "
        "--nan_policy=skip")


def _save_best(workdir, params, step):
    best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
    best.save(step, {"params": params}, {"step": step}, wait=True)
    best.close()


def _final_evaluation(workdir, evaluate, params, splits, writer, step):
    final = {}
    if splits.validation.size:
        final.update({f"validation/{k}": v
                      for k, v in evaluate(params, splits.validation).items()})
    if splits.test.size:
        best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
        best_step = best.latest_complete_step()
        if best_step is not None:
            restored, _ = best.restore(best_step, {"params": params})
            params = restored["params"]
        best.close()
        final.update({f"test/{k}": v for k, v in evaluate(params, splits.test).items()})
        final["test/checkpoint_step"] = best_step if best_step is not None else step
    if final:
        writer.scalars(step, {k: v for k, v in final.items() if k != "test/checkpoint_step"})
    return final


def _summary(meta_info, progress, final=None):
    out = dict(meta_info)
    out["best"] = {"step": progress.best_step, "validation/perplexity": progress.best_validation
                   if math.isfinite(progress.best_validation) else None}
    out["last"] = {**{f"train/{k}": v for k, v in progress.last_train.items()},
                   **{f"validation/{k}": v for k, v in progress.last_validation.items()}}
    out["skipped_updates"] = progress.skipped_updates
    if final is not None:
        out["final"] = final
        out["finished"] = True
    return out


def _print_book_lines(config, model_config, params, splits, progress, meta_info):
    device = jax.devices()[0]
    ppl = progress.last_train.get("perplexity", float("nan"))
    print(f"perplexity {ppl:.1f}, {meta_info['tokens_per_sec']:.1f} tokens/sec on "
          f"{device.platform}:{device.id} ({device.device_kind})")
    for prefix in ("time traveller", "traveller"):
        ids = splits.vocab.encode(vocab.preprocess(prefix, config.preprocess))
        print(prefix + splits.vocab.decode(generate(model_config, params, ids, 50)))
