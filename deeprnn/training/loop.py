"""The training loop behind `python -m deeprnn.train`, in named phases.

`train_and_evaluate(config, workdir)` prepares the process (compilation cache, host heap,
multi-host start), locks the workdir and takes the stop signals, then runs a `Trainer`:

    Trainer(...)            the run rebuilt from its flags (deeprnn.training.setup), resumed
                            from the newest complete checkpoint when there is one
    run():
      start                 state onto the devices, logs opened, steps compiled
      per compiled call:
        train_call          queue --steps_per_call optimizer steps; the host does not wait
        read_logs           the metrics of finished calls, one call behind, as records
        evaluate_and_keep_best   validation when due; best/ when it improves
        write_logs          TensorBoard, metrics.jsonl, the progress line
        after_sync          when due: a sample, a checkpoint, summary.json, the stop
      finish                final validation and test scores, summary.json, the book's lines
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time

import jax
import numpy as np

from deeprnn.config import RunConfig, profile_steps
from deeprnn.data import vocab
from deeprnn.model import lstm_kernels
from deeprnn.model.generation import generate
from deeprnn.run.checkpoints import RunCheckpoints, drop_best, save_best
from deeprnn.run.console import ProgressLine, final_line
from deeprnn.run.lifecycle import (
    Preempted,
    RunFailed,
    StopSignals,
    check_workdir_location,
    describe_os_error,
    fault_point,
    locked_workdir,
)
from deeprnn.run.metadata import run_metadata
from deeprnn.run.process import enable_compilation_cache, keep_freed_host_memory
from deeprnn.run.summary import finished_summary, write_summary
from deeprnn.run.writers import RunWriter
from deeprnn.training.device_batches import sampler_starts
from deeprnn.training.evaluation import evaluate_on_devices, final_evaluation
from deeprnn.training.memory_check import check_fits
from deeprnn.training.parallel import start_multihost
from deeprnn.training.progress import (
    Progress,
    TrainingClock,
    all_finite,
    as_seed_list,
    non_finite_error,
    run_summary,
    run_totals,
    seed_record,
    skipped_updates,
    train_records,
)
from deeprnn.training.setup import (
    Schedule,
    abstract_training_state,
    adopt_nan_policy,
    check_held_out,
    check_same_text,
    initial_training_state,
    load_splits,
    make_devices,
    make_samplers,
    model_config_for,
    refuse_another_runs_logs,
    resume_target,
    sample_prefix_ids,
    saved_nan_policy,
    warn_if_eval_batch_changed,
)
from deeprnn.training.train_step import eval_step, train_steps


def train_and_evaluate(config: RunConfig, workdir: str) -> dict:
    """Trains, evaluates and checkpoints one run in `workdir`; returns the run's summary.

    Raises UsageError (bad input; NonFiniteError), lifecycle.Preempted (SIGTERM/SIGINT: the
    last finished step was checkpointed), RunFailed or OSError (a write failed). The workdir
    is locked for the whole run (process 0's lock on multi-host runs).
    """
    check_workdir_location(workdir)
    enable_compilation_cache()
    keep_freed_host_memory()
    start_multihost(config.multihost, config.coordinator_address, config.num_processes,
                    config.process_id)
    lstm_kernels.check_backend(config.lstm_kernel, jax.default_backend())
    multihost = jax.process_count() > 1
    with locked_workdir(workdir, multihost), StopSignals(multihost) as stop:
        start_time = time.time()
        store = RunCheckpoints(f"{workdir}/checkpoints", max_to_keep=config.max_to_keep)
        try:
            return Trainer(config, workdir, stop, store, start_time).run()
        finally:
            try:  # saves under way hold good steps (each is saved only after its checks)
                store.close()
            except Exception as err:  # noqa: BLE001 - never hides the failure that ended the run
                logging.error("closing the checkpoints: %s", err)


@dataclasses.dataclass(frozen=True)
class Due:
    """What follows the compiled call that ended at the current step."""
    evaluate: bool
    sample: bool
    save: bool
    stopping: bool

    @property
    def sync(self) -> bool:
        """These need this step's state, so the host waits for its call."""
        return self.evaluate or self.sample or self.save


class Trainer:
    """One run in its workdir: rebuilt from its flags, resumed from its newest complete
    checkpoint, trained to its last step by `run()`."""

    def __init__(self, config: RunConfig, workdir: str, stop: StopSignals,
                 store: RunCheckpoints, start_time: float):
        self.config, self.workdir, self.stop, self.store = config, workdir, stop, store
        self.start_time = start_time
        self.is_main = jax.process_index() == 0
        # The newest checkpoint that reads back whole; damaged ones are moved aside.
        found = store.restore_newest(resume_target(config, workdir))
        meta = found[2] if found else None
        self.splits = load_splits(config, vocab.Vocab.from_json(meta["vocab"]) if meta else None)
        if meta:
            check_same_text(meta, self.splits)
            warn_if_eval_batch_changed(meta, config)
        if not found:
            refuse_another_runs_logs(config, workdir)
        check_held_out(config, self.splits)
        self.prefix_ids = sample_prefix_ids(config, self.splits.vocab)  # refused before training
        self.devices = make_devices(config)
        self.samplers = make_samplers(config, self.splits.train,
                                      self.devices.rows(config.batch_size))
        self.devices.rows(config.eval_batch_size, "eval_batch_size")  # refused before training
        self.schedule = Schedule.of(config, self.samplers[0].steps_per_epoch)
        self.model_config = model_config_for(config, self.splits.vocab.size)
        if not found:  # a resumed run fitted when it was saved (its sizes cannot change)
            self._check_memory()
        self.model, self.tx, self.lr_fn, self.state, self.carry = initial_training_state(
            config, self.model_config, self.schedule.num_train_steps)
        self.progress = Progress.fresh(config.num_seeds)
        self.resumed = found is not None
        if found:
            step, restored, meta = found
            self.state = adopt_nan_policy(restored["train"], self.state,
                                          saved_nan_policy(meta, config), config.nan_policy)
            self.carry = restored["carry"]
            self.progress = Progress(**meta["progress"])
            if self.is_main:  # the CLI hides INFO logs; a resume is worth one visible line
                print(f"resuming from step {step} in {workdir}", file=sys.stderr)
        self.step = int(np.asarray(self.state.step).ravel()[0])
        self.tokens_per_step = config.batch_size * config.num_steps * config.num_seeds

    def _check_memory(self) -> None:
        """Refuses a model that cannot fit before its state is allocated (memory_check.py)."""
        one_seed = dataclasses.replace(self.config, num_seeds=1)
        state, carry = abstract_training_state(one_seed, self.model_config)
        check_fits(self.config, self.model_config, state, carry,
                   num_tokens=len(self.splits.train),
                   rows=self.config.batch_size // self.devices.num_devices)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except OSError as err:  # a log, summary or event write: name the file and the step
            raise RunFailed(describe_os_error(err, self.step)) from err

    def _run(self) -> dict:
        last = self.schedule.num_train_steps
        if self.step >= last and (done := finished_summary(self.workdir, self.step)):
            if self.is_main:  # rerunning would rewrite its summary with an empty run's speed
                print(f"{self.workdir} finished at step {self.step}; nothing to do",
                      file=sys.stderr)
            return done
        self._start()
        while self.step < last:
            due = self._train_call()
            records = self._read_logs(due)
            if records is None:
                continue
            if due.evaluate:
                self._evaluate_and_keep_best(records)
            self._write_logs(records)
            if due.sync:
                self._after_sync(due)
        return self._finish()

    def _start(self) -> None:
        """State and carry onto the devices, the logs opened, the steps compiled."""
        cfg = self.config
        self.state, self.carry = self.devices.from_logical(self.state, self.carry)
        if not self.resumed:  # a start that crashed before its first checkpoint left these
            drop_best(self.workdir)
        # resume_step=-1 clears logs left by a run that crashed before its first checkpoint.
        self.writer = RunWriter(self.workdir, enabled=self.is_main, tensorboard=cfg.tensorboard,
                                resume_step=self.step if self.resumed else -1)
        self.meta_info = run_metadata(cfg, self.model_config, self._local_params(), self.splits,
                                      self.schedule.num_train_steps)
        self.writer.hparams({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None},
                            ["train/perplexity", "validation/perplexity",
                             "validation/bits_per_char", "test/perplexity",
                             "test/bits_per_char"])
        self.run_steps = self.devices.compile_train(
            functools.partial(train_steps, apply_fn=self.model.apply, tx=self.tx,
                              skip_nonfinite=cfg.nan_policy == "skip"),
            self.samplers[0].ids, cfg.num_steps)
        self.eval_fn = self.devices.compile_eval(
            functools.partial(eval_step, apply_fn=self.model.apply))
        self.profile = profile_steps(cfg)
        self.line = ProgressLine(self.schedule.num_train_steps) if self.is_main else None
        self.pending = []  # (first step, steps, metrics on the device) of calls not read yet
        self.clock = TrainingClock()

    # -- one compiled call and what follows it ------------------------------------------------
    def _train_call(self) -> Due:
        """Queues one compiled call of up to --steps_per_call steps; waits only for the first
        (its compilation stays out of the throughput)."""
        first = self.step
        count = min(self.config.steps_per_call, self.schedule.num_train_steps - first)
        if self.profile and self.profile[0] <= first < self.profile[0] + self.config.steps_per_call:
            jax.profiler.start_trace(f"{self.workdir}/profile")
        starts, resets = self._window_starts(first, count)
        self.state, self.carry, metrics = self.run_steps(self.state, starts, self.carry, resets)
        if self.clock.first_call is None:
            jax.block_until_ready(metrics)
            seconds = self.clock.first_call_done(count)
            self.meta_info.update(startup_s=time.time() - self.start_time, first_call_s=seconds)
        self.step += count
        fault_point("after_step", self.step)
        self.store.record_finished_saves()
        if self.profile and self.step > self.profile[1] and first <= self.profile[1]:
            jax.block_until_ready(self.state)
            jax.profiler.stop_trace()
        self.pending.append((first, count, metrics))  # no host sync until needed
        return self._due()

    def _due(self) -> Due:
        step, schedule = self.step, self.schedule
        stopping = self.stop.should_stop(step, self.store)  # every call, on every process
        last = step == schedule.num_train_steps
        return Due(evaluate=(step % schedule.eval_every == 0 or last)
                   and bool(self.splits.validation.size),
                   sample=step % schedule.sample_every == 0 or last,
                   save=step % schedule.checkpoint_every == 0 or last or stopping,
                   stopping=stopping)

    def _read_logs(self, due: Due) -> dict[int, dict] | None:
        """The train records of the calls read now, or None when none of them logs.

        Logs are read one call behind: the device runs the call just queued while the host
        writes the ones before (1-3 ms a call here; a d2l call takes ~13 ms on an H200).
        Evaluation, samples, checkpoints and the skipped-update count wait for this step.
        """
        cfg = self.config
        ready = self.pending if due.sync or cfg.nan_policy == "skip" else self.pending[:-1]
        every = cfg.log_every  # does a step among first+1..first+count log?
        if not due.sync and not any((f + c) // every > f // every for f, c, _ in ready):
            return None
        fetched = jax.device_get([m for _, _, m in ready])
        self.pending = self.pending[len(ready):]
        ready_steps = sum(c for _, c, _ in ready)
        elapsed = self.clock.read(ready_steps)  # the fetch waited for the calls it read
        calls = [(f, m) for (f, _, _), m in zip(ready, fetched, strict=True)]
        records = train_records(self.progress, calls, log_every=cfg.log_every,
                                last_step=self.schedule.num_train_steps,
                                nan_policy=cfg.nan_policy, store=self.store, lr_fn=self.lr_fn,
                                rate=ready_steps * self.tokens_per_step / max(elapsed, 1e-9))
        if cfg.nan_policy == "skip":
            self._count_skipped_updates(records)
        return records

    def _count_skipped_updates(self, records: dict[int, dict]) -> None:
        skipped = skipped_updates(self.state.opt_state)
        if skipped > self.progress.skipped_updates:
            logging.warning("%d update(s) with a non-finite gradient skipped by step %d",
                            skipped, self.step)
        self.progress.skipped_updates = skipped
        for record in records.values():
            record["train/skipped_updates"] = skipped

    def _evaluate_and_keep_best(self, records: dict[int, dict]) -> None:
        validation = seed_record("validation",
                                 self._evaluate(self._logical_params(), self.splits.validation))
        records.setdefault(self.step, {}).update(validation)
        self.progress.last_validation = validation
        if validation["validation/perplexity"] < self.progress.best_validation:
            self.progress.best_validation = validation["validation/perplexity"]
            self.progress.best_step = self.step
            save_best(self.workdir, self._logical_params(), self.step)

    def _write_logs(self, records: dict[int, dict]) -> None:
        for step, record in sorted(records.items()):
            self.writer.scalars(step, record)
        if self.line and records:
            self.line.update(max(records), records[max(records)])

    def _after_sync(self, due: Due) -> None:
        """A sample and a checkpoint when due, summary.json when it gained something, and the
        stop after a signal (the checkpoint of this step is saved first)."""
        if due.sample:
            text = self.splits.vocab.decode(generate(self.model_config, self._local_params(),
                                                     self.prefix_ids, self.config.sample_length))
            prefix = self.config.sample_prefix
            self.writer.texts(self.step, {f"samples/{prefix}": prefix + text})
        if due.save:
            self._save(wait=self.step == self.schedule.num_train_steps or due.stopping)
        self.clock.restart()  # evaluation, samples and checkpoints excluded
        totals = self._totals()
        self.meta_info.update(steps_done=self.step, wall_time_s=totals["wall_time_s"],
                              tokens_per_sec=totals["tokens_per_sec"])
        # Rewritten (fsync, or a GCS upload) when it gains a score or a checkpoint, not each epoch.
        if self.is_main and (due.evaluate or due.save):
            write_summary(self.workdir, run_summary(self.meta_info, self.progress))
        if due.stopping:
            raise Preempted(self.step, self.stop.received or "a signal")

    def _finish(self) -> dict:
        if self.line:
            self.line.done()
        if self.stop.received and not self.stop.multihost:  # saved; evaluate on resume
            raise Preempted(self.step, self.stop.received)
        final, per_seed = final_evaluation(self.workdir, self._evaluate, self._logical_params(),
                                           self.splits, self.writer, self.step)
        totals = self._totals()
        self.meta_info.update(steps_done=self.step, wall_time_s=totals["wall_time_s"],
                              tokens_per_sec=totals["tokens_per_sec"])
        summary = run_summary(self.meta_info, self.progress, final, per_seed)
        if self.is_main:
            write_summary(self.workdir, summary)
            self._print_final_lines(final)
        self.writer.close()
        return summary

    # -- helpers of the phases ----------------------------------------------------------------
    def _window_starts(self, first: int, count: int):
        """Window starts [count, (K,) rows] and resets [count] for steps first..first+count-1:
        the windows themselves are cut on the device, from the token array placed there once."""
        starts = np.stack([sampler_starts(sampler, first, count) for sampler in self.samplers],
                          axis=1)
        if self.config.num_seeds == 1:
            starts = starts[:, 0]
        # Every seed's sampler has the same epoch length, so resets are shared.
        return starts, np.asarray([self.samplers[0].resets_state(s)
                                   for s in range(first, first + count)])

    def _evaluate(self, params, ids) -> list[dict]:
        """Scores a split with logical params; one dict per seed."""
        return as_seed_list(evaluate_on_devices(
            self.devices, self.eval_fn, self.model_config, params, ids,
            batch_size=self.config.eval_batch_size, num_steps=self.config.num_steps))

    def _save(self, wait: bool) -> None:
        if not all_finite(self.state.params):
            raise non_finite_error(self.step, ["parameters"], self.store)
        self.writer.flush()  # logs up to this step are durable before the checkpoint covers them
        # The progress as a resumed process would need it: its training time so far is
        # "earlier" time for the process that resumes from this checkpoint.
        progress = {**dataclasses.asdict(self.progress), **self._totals()["saved"]}
        meta = {"flags": dataclasses.asdict(self.config), "vocab": self.splits.vocab.to_json(),
                "progress": progress, "num_train_steps": self.schedule.num_train_steps,
                "documents": [{"name": d["name"], "sha256": d["sha256"],
                               "text_sha256": d["text_sha256"]} for d in self.splits.documents]}
        state, carry = self.devices.logical(self.state, self.carry)
        self.store.save(self.step, {"train": state, "carry": carry}, meta, wait=wait)

    def _totals(self) -> dict:
        return run_totals(self.progress, self.clock, self.start_time, self.tokens_per_step)

    def _logical_params(self):
        return self.devices.logical(self.state, self.carry)[0].params

    def _local_params(self):
        """This process's own copy (seed 0's): generation runs on process 0 alone."""
        return self.devices.on_one_device(self._logical_params())

    def _print_final_lines(self, final: dict) -> None:
        """The scores the run is judged by (console.final_line), then the book's samples."""
        ppl = self.progress.last_train.get("train/perplexity", float("nan"))
        print(final_line(final, ppl, self.meta_info["tokens_per_sec"], jax.devices()[0]))
        params = self._local_params()
        for prefix in ("time traveller", "traveller"):
            ids = self.splits.vocab.encode(vocab.preprocess(prefix, self.config.preprocess))
            print(prefix + self.splits.vocab.decode(generate(self.model_config, params, ids, 50)))
