"""The training loop behind `python -m deeprnn.train`: data, model, steps, logs, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn import batches, corpora, models, multistep, seeds, steps, vocab
from deeprnn.checkpoints import RunCheckpoints
from deeprnn.console import ProgressLine
from deeprnn.errors import UsageError
from deeprnn.evaluate import evaluate_ids
from deeprnn.flags import RunConfig, model_flag_differences, profile_steps
from deeprnn.generation import generate
from deeprnn.jax_setup import enable_compilation_cache, keep_freed_host_memory
from deeprnn.lifecycle import Preempted, RunFailed, StopSignals, WorkdirLock, fault_point
from deeprnn.parallel import DataParallel, start_multihost
from deeprnn.run_info import run_metadata
from deeprnn.run_metrics import (
    Progress,
    as_seed_list,
    non_finite_error,
    run_summary,
    seed_record,
    skipped_updates,
    throughput,
    train_records,
)
from deeprnn.writers import RunWriter, finished_summary, write_summary


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
    """The model, optimizer, learning-rate schedule, fresh TrainState and zero carry.

    With --num_seeds=K, the state and carry of seeds seed..seed+K-1 stacked on a leading axis.
    """
    model = models.build_model(model_config)
    lr_fn = steps.make_learning_rate(config.lr, config.lr_schedule, num_train_steps,
                                     config.warmup_steps)
    tx = steps.make_optimizer(config.optimizer, lr_fn, config.clip_norm,
                              skip_nonfinite=config.nan_policy == "skip")

    def fresh(seed):
        init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
        params = models.init_params(model_config, init_key)
        return steps.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                                opt_state=tx.init(params), rng=dropout_key)

    carry = models.init_carry(model_config, config.batch_size)
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


def _intervals(config: RunConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """eval, sample and checkpoint intervals; defaults rounded up to whole compiled calls."""
    per_call = config.steps_per_call
    epoch = -(-steps_per_epoch // per_call) * per_call
    eval_every = config.eval_every or epoch
    sample_every = config.sample_every or eval_every
    checkpoint_every = config.checkpoint_every or -(-max(eval_every, 500) // per_call) * per_call
    return eval_every, sample_every, checkpoint_every


def train_and_evaluate(config: RunConfig, workdir: str) -> dict:
    """Trains, evaluates and checkpoints one run in `workdir`; returns the run's summary.

    Raises UsageError (bad input; NonFiniteError), lifecycle.Preempted (SIGTERM/SIGINT: the
    last finished step was checkpointed), RunFailed or OSError (a write failed). The workdir
    is locked for the whole run (process 0's lock on multi-host runs).
    """
    enable_compilation_cache()
    keep_freed_host_memory()
    start_multihost(config.multihost, config.coordinator_address, config.num_processes,
                    config.process_id)
    multihost = jax.process_count() > 1
    with _workdir_lock(workdir, multihost), StopSignals(multihost) as stop:
        return _train(config, workdir, stop)


@contextlib.contextmanager
def _workdir_lock(workdir: str, multihost: bool):
    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UsageError as err:
            error = err
    if multihost:  # every process learns process 0's outcome, so none waits in a collective
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
            error = error or UsageError("process 0 could not lock --workdir; see its log")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


def _check_resumable(config, workdir, store, resume_step):
    """The vocabulary of the newest complete checkpoint, after checking its saved flags."""
    if resume_step is None:
        return None
    saved_meta = store.read_meta(resume_step)
    differ = model_flag_differences(saved_meta["flags"], config)
    if differ:
        raise UsageError(f"{workdir} holds a checkpoint made with other flags: "
                         f"{'; '.join(differ)}; use another --workdir or the same flags")
    return vocab.Vocab.from_json(saved_meta["vocab"])


def _check_held_out(config, splits):
    # Evaluation would find this only at the first eval step, after training and saving.
    for name in ("validation", "test"):
        size = getattr(splits, name).size
        if 0 < size < 2 * config.eval_batch_size:
            raise UsageError(f"the {name} split has {size} tokens, too few for "
                             f"--eval_batch_size={config.eval_batch_size} (needs "
                             f"{2 * config.eval_batch_size}); lower --eval_batch_size or give "
                             "the split a larger fraction with --split")


def _train(config: RunConfig, workdir: str, stop: StopSignals) -> dict:
    is_main = jax.process_index() == 0
    start_time = time.time()
    store = RunCheckpoints(f"{workdir}/checkpoints", max_to_keep=config.max_to_keep)
    try:
        return _train_with_store(config, workdir, stop, store, is_main, start_time)
    finally:
        try:  # saves under way hold good steps (each is saved only after its checks)
            store.close()
        except RunFailed as err:
            logging.error("%s", err)


def _train_with_store(config, workdir, stop, store, is_main, start_time):
    resume_step = store.latest_complete_step()
    saved_vocab = _check_resumable(config, workdir, store, resume_step)
    splits = load_splits(config, saved_vocab)
    _check_held_out(config, splits)
    devices = (DataParallel(config.parallel) if config.num_seeds == 1
               else seeds.SeedStack(config.num_seeds))
    rows = devices.rows(config.batch_size)
    samplers = [batches.make_sampler(config.sampler, splits.train, config.batch_size,
                                     config.num_steps, seed, rows=rows)
                for seed in seeds.seed_values(config.seed, config.num_seeds)]
    eval_rows = devices.rows(config.eval_batch_size, "eval_batch_size")
    steps_per_epoch = samplers[0].steps_per_epoch
    num_train_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    eval_every, sample_every, checkpoint_every = _intervals(config, steps_per_epoch)

    model_config = model_config_for(config, splits.vocab.size)
    model, tx, lr_fn, state, carry = initial_training_state(config, model_config,
                                                            num_train_steps)
    progress = Progress.fresh(config.num_seeds)
    if resume_step is not None:
        restored, meta = store.restore(resume_step, {"train": state, "carry": carry})
        state, carry = restored["train"], restored["carry"]
        progress = Progress(**meta["progress"])
        if is_main:  # the CLI hides INFO logs; a resume is worth one visible line
            print(f"resuming from step {resume_step} in {workdir}", file=sys.stderr)
    start_step = int(np.asarray(state.step).ravel()[0])
    if start_step >= num_train_steps and (done := finished_summary(workdir, start_step)):
        if is_main:  # rerunning would rewrite its summary with an empty run's speed and time
            print(f"{workdir} finished at step {start_step}; nothing to do", file=sys.stderr)
        return done
    state, carry = devices.from_logical(state, carry)  # global batch -> this process

    def logical_params():
        return devices.logical(state, carry)[0].params

    def local_params():
        """This process's own copy (seed 0's): generation runs on process 0 alone."""
        return devices.on_one_device(logical_params())

    # resume_step=-1 clears logs left by a run that crashed before its first checkpoint.
    writer = RunWriter(workdir, enabled=is_main, tensorboard=config.tensorboard,
                       resume_step=start_step if resume_step is not None else -1)
    meta_info = run_metadata(config, model_config, local_params(), splits, num_train_steps)
    writer.hparams({k: v for k, v in dataclasses.asdict(config).items() if v is not None},
                   ["validation/perplexity", "validation/bits_per_char", "test/perplexity"])

    run_steps = devices.compile_train(
        functools.partial(steps.train_steps, apply_fn=model.apply, tx=tx), samplers[0].ids,
        config.num_steps)
    eval_fn = devices.compile_eval(functools.partial(steps.eval_step, apply_fn=model.apply))

    def evaluate(params, ids) -> list[dict]:
        """Scores a split with logical params; one dict per seed."""
        eval_carry = devices.shard_rows(models.init_carry(model_config,
                                                          eval_rows[1] - eval_rows[0]))
        return as_seed_list(evaluate_ids(
            eval_fn, model_config, devices.replicate(params), ids, rows=eval_rows,
            carry=eval_carry, batch_size=config.eval_batch_size, num_steps=config.num_steps))
    prefix_ids = splits.vocab.encode(vocab.preprocess(config.sample_prefix, config.preprocess))

    def checkpoint(step, wait=False):
        if not _all_finite(state.params):
            raise non_finite_error(step, ["parameters"], store)
        writer.flush()  # logs up to this step are durable before the checkpoint that covers them
        meta = {"flags": dataclasses.asdict(config), "vocab": splits.vocab.to_json(),
                "progress": dataclasses.asdict(progress), "num_train_steps": num_train_steps}
        logical_state, logical_carry = devices.logical(state, carry)
        store.save(step, {"train": logical_state, "carry": logical_carry}, meta, wait=wait)

    def starts_for(first: int, count: int):
        """Window starts [count, (K,) rows] and resets [count] for steps first..first+count-1:
        the windows themselves are cut on the device, from the token array placed there once."""
        starts = np.stack([multistep.sampler_starts(sampler, first, count)
                           for sampler in samplers], axis=1)
        if config.num_seeds == 1:
            starts = starts[:, 0]
        # Every seed's sampler has the same epoch length, so resets are shared.
        return starts, np.asarray([samplers[0].resets_state(s)
                                   for s in range(first, first + count)])

    profile = profile_steps(config)
    line = ProgressLine(num_train_steps) if is_main else None
    tokens_per_step = config.batch_size * config.num_steps * config.num_seeds
    interval_start, train_time, timed_steps = time.time(), 0.0, 0
    step, pending = start_step, []  # pending: (first step, steps, metrics) of unread calls
    first_call = None  # (seconds, steps) of this process's first call, compilation included
    while step < num_train_steps:
        if profile and profile[0] <= step < profile[0] + config.steps_per_call:
            jax.profiler.start_trace(f"{workdir}/profile")
        first, count = step, min(config.steps_per_call, num_train_steps - step)
        starts, resets = starts_for(first, count)
        state, carry, metrics = run_steps(state, starts, carry, resets)
        if first_call is None:  # one wait, so that compilation stays out of the throughput
            jax.block_until_ready(metrics)
            first_call = (time.time() - interval_start, count)
            meta_info.update(startup_s=time.time() - start_time, first_call_s=first_call[0])
        step += count
        fault_point("after_step", step)
        store.record_finished_saves()
        if profile and step > profile[1] and step - count <= profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        pending.append((first, count, metrics))  # device arrays: no host sync until needed
        stopping = stop.should_stop(step, store)  # every call, on every process
        evaluate_now = (step % eval_every == 0 or step == num_train_steps) and bool(
            splits.validation.size)
        sample_now = step % sample_every == 0 or step == num_train_steps
        save_now = step % checkpoint_every == 0 or step == num_train_steps or stopping
        # Logs are read one call behind: the device runs the call just queued while the host
        # writes the ones before (1-3 ms a call here; a d2l call takes ~13 ms on an H200).
        # Evaluation, samples, checkpoints and the skipped-update count wait for this step.
        sync = evaluate_now or sample_now or save_now
        ready = pending if sync or config.nan_policy == "skip" else pending[:-1]
        every = config.log_every  # does a step among first+1..first+count log?
        if not sync and not any((f + c) // every > f // every for f, c, _ in ready):
            continue
        fetched, pending = jax.device_get([m for _, _, m in ready]), pending[len(ready):]
        now = time.time()  # the fetch waited for the calls read, so the clock covers them
        elapsed, interval_start = now - interval_start, now
        ready_steps = sum(c for _, c, _ in ready)
        train_time, timed_steps = train_time + elapsed, timed_steps + ready_steps
        calls = [(f, m) for (f, _, _), m in zip(ready, fetched, strict=True)]
        records = train_records(progress, calls,
                                log_every=config.log_every, last_step=num_train_steps,
                                nan_policy=config.nan_policy, store=store, lr_fn=lr_fn,
                                rate=ready_steps * tokens_per_step / max(elapsed, 1e-9))
        if config.nan_policy == "skip":
            skipped = skipped_updates(state.opt_state)
            if skipped > progress.skipped_updates:
                logging.warning("%d update(s) with a non-finite gradient skipped by step %d",
                                skipped, step)
            progress.skipped_updates = skipped
            for record in records.values():
                record["train/skipped_updates"] = skipped
        if evaluate_now:
            val = seed_record("validation", evaluate(logical_params(), splits.validation))
            records.setdefault(step, {}).update(val)
            progress.last_validation = val
            if val["validation/perplexity"] < progress.best_validation:
                progress.best_validation, progress.best_step = val["validation/perplexity"], step
                _save_best(workdir, logical_params(), step)
        for s, record in sorted(records.items()):
            writer.scalars(s, record)
        if line and records:
            line.update(max(records), records[max(records)])
        if not sync:
            continue
        if sample_now:
            text = splits.vocab.decode(generate(model_config, local_params(), prefix_ids,
                                                config.sample_length))
            writer.texts(step, {f"samples/{config.sample_prefix}": config.sample_prefix + text})
        if save_now:
            checkpoint(step, wait=step == num_train_steps or stopping)
        interval_start = time.time()  # evaluation, samples and checkpoints excluded
        meta_info.update(steps_done=step, wall_time_s=time.time() - start_time,
                         tokens_per_sec=throughput(timed_steps, train_time, first_call,
                                                    tokens_per_step))
        # Rewritten (fsync, or a GCS upload) when it gains a score or a checkpoint, not each epoch.
        if is_main and (evaluate_now or save_now):
            write_summary(workdir, run_summary(meta_info, progress))
        if stopping:
            raise Preempted(step, stop.received or "a signal")
    if line:
        line.done()
    if stop.received and not stop.multihost:  # the last step is saved; evaluate on resume
        raise Preempted(step, stop.received)

    final, per_seed = _final_evaluation(workdir, evaluate, logical_params(), splits, writer,
                                        step)
    meta_info.update(steps_done=step, wall_time_s=time.time() - start_time)
    summary = run_summary(meta_info, progress, final, per_seed)
    if is_main:
        write_summary(workdir, summary)
        _print_book_lines(config, model_config, local_params(), splits, progress, meta_info)
    writer.close()
    return summary


def _all_finite(tree) -> bool:
    """Checked on the host: the checkpoint that follows copies the parameters there anyway, and
    a jitted check cost a compilation (0.2 s on the 2-core CPU) for a test once per save."""
    def local(leaf):  # a replicated global array: this process's first copy
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_shards[0].data
        return np.asarray(leaf)
    return all(bool(np.isfinite(local(x)).all()) for x in jax.tree.leaves(tree))


def _save_best(workdir, params, step):
    best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
    best.save(step, {"params": params}, {"step": step}, wait=True, drop_later=True)
    best.close()


def _final_evaluation(workdir, evaluate, params, splits, writer, step):
    """Validation on the last params, test on the best-validation params; means over seeds
    (with per-seed values for --num_seeds) and the per-seed finals."""
    final, per_seed = {}, None
    if splits.validation.size:
        validation = evaluate(params, splits.validation)
        per_seed = [{f"validation/{k}": v for k, v in d.items()} for d in validation]
        final.update(seed_record("validation", validation))
    if splits.test.size:
        best = RunCheckpoints(f"{workdir}/best", max_to_keep=1, async_save=False)
        best_step = best.latest_complete_step()
        if best_step is not None:
            restored, _ = best.restore(best_step, {"params": params})
            params = restored["params"]
        best.close()
        test = evaluate(params, splits.test)
        final.update(seed_record("test", test))
        per_seed = [{**(per_seed[k] if per_seed else {}),
                     **{f"test/{key}": v for key, v in d.items()}} for k, d in enumerate(test)]
        final["test/checkpoint_step"] = best_step if best_step is not None else step
    if final:
        writer.scalars(step, {k: v for k, v in final.items() if k != "test/checkpoint_step"})
    return final, per_seed


def _print_book_lines(config, model_config, params, splits, progress, meta_info):
    device = jax.devices()[0]
    ppl = progress.last_train.get("train/perplexity", float("nan"))
    print(f"perplexity {ppl:.1f}, {meta_info['tokens_per_sec']:.1f} tokens/sec on "
          f"{device.platform}:{device.id} ({device.device_kind})")
    for prefix in ("time traveller", "traveller"):
        ids = splits.vocab.encode(vocab.preprocess(prefix, config.preprocess))
        print(prefix + splits.vocab.decode(generate(model_config, params, ids, 50)))
