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
    """Sums since the last log (one entry per seed), the best validation so far, and the
    training time of the processes before this one (a resumed run reports totals)."""
    loss_sum: list = dataclasses.field(default_factory=lambda: [0.0])
    tokens: list = dataclasses.field(default_factory=lambda: [0.0])
    steps: list = dataclasses.field(default_factory=lambda: [0])  # in the window, per seed
    skipped: list = dataclasses.field(default_factory=lambda: [0])  # of those, non-finite
    best_validation: float = math.inf
    best_step: int = -1
    skipped_updates: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)
    last_validation: dict = dataclasses.field(default_factory=dict)
    # Of the processes before this one, up to the checkpoint this one resumed from: training
    # seconds and steps (each process's first call, its compilation, left out) and wall time.
    earlier_train_s: float = 0.0
    earlier_timed_steps: int = 0
    earlier_wall_s: float = 0.0

    def __post_init__(self):
        seeds = len(self.loss_sum)
        if len(self.steps) != seeds:  # restored from a checkpoint that predates these counts
            self.steps, self.skipped = [0] * seeds, [0] * seeds

    @classmethod
    def fresh(cls, num_seeds: int) -> Progress:
        return cls(loss_sum=[0.0] * num_seeds, tokens=[0.0] * num_seeds, steps=[0] * num_seeds,
                   skipped=[0] * num_seeds)

    def train_summaries(self) -> list[dict]:
        """Per-seed loss/perplexity/bits since the last log; the sums restart."""
        out = []
        for loss_sum, tokens in zip(self.loss_sum, self.tokens, strict=True):
            summary = summarize(loss_sum, tokens)
            out.append(summary if tokens else dict.fromkeys(summary, math.nan))
        seeds = len(self.loss_sum)
        self.loss_sum, self.tokens = [0.0] * seeds, [0.0] * seeds
        self.steps, self.skipped = [0] * seeds, [0] * seeds
        return out


def per_step(metrics: dict, index: int) -> dict:
    """Step `index` of a call's stacked metrics, as numpy arrays over seeds (shape [K] or [])."""
    return {k: np.asarray(v)[index] for k, v in metrics.items()}


def accumulate(progress: Progress, step: int, metrics: dict, nan_policy: str, store) -> None:
    """Adds one step's metrics (per seed) to the running sums, after checking they are finite."""
    losses = np.atleast_1d(metrics["loss_sum"]).astype(float)
    tokens = np.atleast_1d(metrics["tokens"]).astype(float)
    nonfinite = np.broadcast_to(np.atleast_1d(metrics.get("nonfinite", 0.0)), losses.shape)
    values = {"loss": float(losses.sum()), "grad_norm": float(np.max(metrics["grad_norm"]))}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad and nan_policy != "skip":
        raise non_finite_error(step, bad, store, "stop")
    if bad:  # the update was skipped (apply_if_finite): the step logs, its loss does not count
        logging.warning("step %d: non-finite %s; update skipped", step, ", ".join(bad))
    for k, (loss, count) in enumerate(zip(losses, tokens, strict=True)):
        progress.steps[k] += 1
        if nonfinite[k] or not math.isfinite(loss):
            progress.skipped[k] += 1
        else:  # a skipped step's loss would poison the window's mean
            progress.loss_sum[k] += loss
            progress.tokens[k] += count


def check_not_all_skipped(progress: Progress, step: int, store) -> None:
    """--nan_policy=skip: a window whose every update was skipped is a run that has stopped
    learning; it stops as under --nan_policy=stop, naming the last good checkpoint."""
    for seed, (steps, skipped) in enumerate(zip(progress.steps, progress.skipped, strict=True)):
        if steps and skipped == steps:
            which = f" of seed {seed}" if len(progress.steps) > 1 else ""
            raise non_finite_error(step, [f"loss or gradient in every update{which} of steps "
                                          f"{step - steps + 1}-{step} (all skipped)"], store,
                                   "skip")


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
                covered = [s - k for s, k in zip(progress.steps, progress.skipped, strict=True)]
                if nan_policy == "skip":
                    check_not_all_skipped(progress, step, store)
                summaries = progress.train_summaries()
                if nan_policy == "skip":  # how many steps the logged loss averages
                    summaries = [{**d, "loss_steps": float(n)}
                                 for d, n in zip(summaries, covered, strict=True)]
                records[step] = {**seed_record("train", summaries),
                                 "train/grad_norm": float(np.mean(m["grad_norm"])),
                                 "train/learning_rate": float(lr_fn(step - 1)),
                                 "train/tokens_per_sec": rate}
                progress.last_train = records[step]
    return records


# The advice of a non-finite stop, by the --nan_policy in force (None: not known to the caller).
NON_FINITE_ADVICE = {
    "stop": "lower --lr, or pass --nan_policy=skip to skip such updates",
    "skip": "skipping cannot help when every update fails: lower --lr (or --clip_norm) and "
            "run again",
    None: "lower --lr (under --nan_policy=stop, --nan_policy=skip would skip such updates)",
}


def non_finite_error(step: int, bad: list[str], store,
                     nan_policy: str | None = None) -> NonFiniteError:
    store.wait()  # saves under way hold good steps: complete them before naming the last one
    last = store.latest_complete_step()
    return NonFiniteError(
        f"non-finite {', '.join(bad)} at step {step}; last good checkpoint: "
        f"{'step ' + str(last) if last is not None else 'none'} (kept; nothing newer was "
        f"saved); {NON_FINITE_ADVICE[nan_policy]}")


def skipped_updates(opt_state) -> int:
    """optax.apply_if_finite's own count of the updates it dropped (its total_notfinite)."""
    return int(np.asarray(jax.device_get(opt_state.total_notfinite)).ravel().max())


def net_of_first_call(steps_run: int, train_time: float, first_call) -> tuple[int, float]:
    """(steps, seconds) of training, leaving out the first call (its compilation would
    otherwise count as training time: on a GPU it can take longer than the whole run's
    steps); with nothing after the first call, the first call is all there is."""
    if first_call is None:
        return 0, 0.0
    seconds, steps = first_call
    if steps_run > steps and train_time > seconds:
        return steps_run - steps, train_time - seconds
    return steps_run, train_time


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

    def net(self) -> tuple[int, float]:
        """(steps, seconds) this process trained, its first call left out."""
        return net_of_first_call(self.timed_steps, self.train_time, self.first_call)


def run_totals(progress: Progress, clock: TrainingClock, start_time: float,
               tokens_per_step: int) -> dict:
    """wall_time_s and tokens_per_sec over every process of the run so far (each process up to
    its last checkpoint, this one up to now), and the same sums to save in a checkpoint."""
    steps, seconds = clock.net()
    steps, seconds = steps + progress.earlier_timed_steps, seconds + progress.earlier_train_s
    wall = progress.earlier_wall_s + time.time() - start_time
    return {"wall_time_s": wall,
            "tokens_per_sec": steps * tokens_per_step / seconds if seconds > 0 else 0.0,
            "saved": {"earlier_train_s": seconds, "earlier_timed_steps": steps,
                      "earlier_wall_s": wall}}


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
