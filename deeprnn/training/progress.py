"""The training loop's bookkeeping: running sums per seed, records, the clock, the summary.

Everything here is host-side; Progress is saved in checkpoints, so a resumed run writes exactly
the records an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax
import numpy as np

from deeprnn.errors import UsageError
from deeprnn.training.train_step import summarize


class NonFiniteError(UsageError):
    """A NaN or inf loss/gradient/parameter under --nan_policy=stop."""


@dataclasses.dataclass
class Progress:
    """Sums since the last log (one entry per seed) and the best validation so far."""
    loss_sum: list = dataclasses.field(default_factory=lambda: [0.0])
    tokens: list = dataclasses.field(default_factory=lambda: [0.0])
    best_validation: float = math.inf
    best_step: int = -1
    skipped_updates: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)
    last_validation: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def fresh(cls, num_seeds: int) -> Progress:
        return cls(loss_sum=[0.0] * num_seeds, tokens=[0.0] * num_seeds)

    def train_summaries(self) -> list[dict]:
        """Per-seed loss/perplexity/bits since the last log; the sums restart."""
        out = []
        for loss_sum, tokens in zip(self.loss_sum, self.tokens, strict=True):
            summary = summarize(loss_sum, tokens)
            out.append(summary if tokens else dict.fromkeys(summary, math.nan))
        self.loss_sum = [0.0] * len(self.loss_sum)
        self.tokens = [0.0] * len(self.tokens)
        return out


def per_step(metrics: dict, index: int) -> dict:
    """Step `index` of a call's stacked metrics, as numpy arrays over seeds (shape [K] or [])."""
    return {k: np.asarray(v)[index] for k, v in metrics.items()}


def accumulate(progress: Progress, step: int, metrics: dict, nan_policy: str, store) -> None:
    """Adds one step's metrics (per seed) to the running sums, after checking they are finite."""
    losses = np.atleast_1d(metrics["loss_sum"]).astype(float)
    tokens = np.atleast_1d(metrics["tokens"]).astype(float)
    values = {"loss": float(losses.sum()), "grad_norm": float(np.max(metrics["grad_norm"]))}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad and nan_policy != "skip":
        raise non_finite_error(step, bad, store)
    if bad:  # apply_if_finite skips the update when a gradient is non-finite
        logging.warning("step %d: non-finite %s", step, ", ".join(bad))
    for k, (loss, count) in enumerate(zip(losses, tokens, strict=True)):
        if math.isfinite(loss):  # a skipped step's NaN loss would poison the interval's mean
            progress.loss_sum[k] += loss
            progress.tokens[k] += count


def train_records(progress: Progress, calls, *, log_every: int, last_step: int, nan_policy: str,
                  store, lr_fn, rate: float) -> dict[int, dict]:
    """Adds fetched calls [(first step, stacked metrics)], in step order, to the running sums;
    the train records of the steps among them that log (every log_every-th, and the last)."""
    records = {}
    for first, metrics in calls:
        for i in range(len(metrics["loss_sum"])):
            step, m = first + i + 1, per_step(metrics, i)
            accumulate(progress, step, m, nan_policy, store)
            if step % log_every == 0 or step == last_step:
                records[step] = {**seed_record("train", progress.train_summaries()),
                                 "train/grad_norm": float(np.mean(m["grad_norm"])),
                                 "train/learning_rate": float(lr_fn(step - 1)),
                                 "train/tokens_per_sec": rate}
                progress.last_train = records[step]
    return records


def non_finite_error(step: int, bad: list[str], store) -> NonFiniteError:
    store.wait()  # saves under way hold good steps: complete them before naming the last one
    last = store.latest_complete_step()
    return NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step}; last good checkpoint: "
        f"{'step ' + str(last) if last is not None else 'none'} (kept; nothing newer was "
        "saved); lower --lr, or pass --nan_policy=skip to skip such updates")


def skipped_updates(opt_state) -> int:
    """optax.apply_if_finite's own count of the updates it dropped (its total_notfinite)."""
    return int(np.asarray(jax.device_get(opt_state.total_notfinite)).ravel().max())


def throughput(steps_run: int, train_time: float, first_call, tokens_per_step: int) -> float:
    """Tokens per second of training, leaving out the first call (its compilation would
    otherwise count as training time: on a GPU it can take longer than the whole run's
    steps); with nothing after the first call, the first call is all there is."""
    seconds, steps = first_call
    if steps_run > steps and train_time > seconds:
        steps_run, train_time = steps_run - steps, train_time - seconds
    return steps_run * tokens_per_step / max(train_time, 1e-9)


class TrainingClock:
    """The host's clock over training calls: time spent training and the steps it covers,
    without evaluation, samples and checkpoints (`restart` after them), and the first call
    (compilation included) kept apart."""

    def __init__(self):
        self.interval_start = time.time()
        self.train_time, self.timed_steps = 0.0, 0
        self.first_call: tuple[float, int] | None = None  # (seconds, steps)

    def first_call_done(self, steps: int) -> float:
        """Call once the first call's results are ready; returns its seconds."""
        self.first_call = (time.time() - self.interval_start, steps)
        return self.first_call[0]

    def read(self, steps: int) -> float:
        """`steps` more have finished (their results were fetched): the seconds they took."""
        now = time.time()
        elapsed, self.interval_start = now - self.interval_start, now
        self.train_time, self.timed_steps = self.train_time + elapsed, self.timed_steps + steps
        return elapsed

    def restart(self) -> None:
        self.interval_start = time.time()

    def tokens_per_sec(self, tokens_per_step: int) -> float:
        return throughput(self.timed_steps, self.train_time, self.first_call, tokens_per_step)


def all_finite(tree) -> bool:
    """Checked on the host: the checkpoint that follows copies the parameters there anyway, and
    a jitted check cost a compilation (0.2 s on the 2-core CPU) for a test once per save."""
    def local(leaf):  # a replicated global array: this process's first copy
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_shards[0].data
        return np.asarray(leaf)
    return all(bool(np.isfinite(local(x)).all()) for x in jax.tree.leaves(tree))


def seed_record(prefix: str, per_seed: list[dict]) -> dict:
    """Tags for one split: the value itself for one seed; for several, the mean over seeds
    under the plain tag, `<tag>_std` for their spread and `seed_<k>/<tag>` for each."""
    if len(per_seed) == 1:
        return {f"{prefix}/{k}": v for k, v in per_seed[0].items()}
    record = {}
    for key in per_seed[0]:
        values = np.asarray([s[key] for s in per_seed], dtype=float)
        record[f"{prefix}/{key}"] = float(values.mean())
        record[f"{prefix}/{key}_std"] = float(values.std(ddof=1))
        for k, value in enumerate(values):
            record[f"seed_{k}/{prefix}/{key}"] = float(value)
    return record


def as_seed_list(result) -> list[dict]:
    return result if isinstance(result, list) else [result]


def run_summary(meta_info: dict, progress: Progress, final: dict | None = None,
                seeds: list[dict] | None = None) -> dict:
    out = dict(meta_info)
    out["best"] = {"step": progress.best_step, "validation/perplexity": progress.best_validation
                   if math.isfinite(progress.best_validation) else None}
    out["last"] = {**progress.last_train, **progress.last_validation}
    out["skipped_updates"] = progress.skipped_updates
    if final is not None:
        out["final"] = final
        out["finished"] = True
    if seeds is not None and len(seeds) > 1:
        out["seeds"] = seeds
    return out
