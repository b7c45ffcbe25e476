"""Batches [B, T] of inputs and next-token targets, after d2l 0.17's two schemes.

random      seq_data_iter_random: each epoch drops a random offset in [0, T-1], cuts the rest into
            non-overlapping windows of T and serves them in a random order, B per batch; the RNN
            state starts at zero for every batch.
sequential  seq_data_iter_sequential: each epoch drops a random offset in [0, T], lays the rest
            out as B contiguous streams, and batch k+1 continues each stream where batch k ended,
            so the RNN state carries over (detached); it is reset at the first batch of an epoch.

Everything is a pure function of (seed, step): the epoch's offset and order come from a
generator seeded with (seed, epoch), so a resumed run asks for batch(step) and needs no replay.
steps_per_epoch is the count for the worst-case offset, the same for every epoch, so that
epoch = step // steps_per_epoch. `rows=(start, stop)` builds only those rows of the global batch:
N processes, each with its own rows, together produce exactly what one process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from deeprnn.config import CHOICES
from deeprnn.errors import UsageError

SAMPLER_KINDS = CHOICES["sampler"]


def _token_array(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"token ids must be a flat integer array, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int32, copy=False)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if int(value) < 1:
            raise UsageError(f"--{name}={value} must be a positive integer")


def _check_rows(rows: tuple[int, int] | None, batch_size: int) -> tuple[int, int]:
    if rows is None:
        return 0, batch_size
    start, stop = (int(r) for r in rows)
    if not 0 <= start < stop <= batch_size:
        raise UsageError(f"rows={rows} must satisfy 0 <= start < stop <= batch_size={batch_size}")
    return start, stop


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; the modulus keeps distinct seeds distinct.
    return np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), int(epoch)]))


def _windows(ids: np.ndarray, starts: np.ndarray, num_steps: int):
    """x[i] = ids[starts[i] : starts[i] + T], y[i] the same shifted by one token."""
    window = ids[starts[:, None] + np.arange(num_steps + 1)]
    return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])


def _too_short(kind: str, length: int, batch_size: int, num_steps: int, needed: int):
    return UsageError(
        f"the text has {length} tokens, too short for one {kind} batch of batch_size={batch_size}"
        f" x num_steps={num_steps} (needs at least {needed}); lower --batch_size/--num_steps"
        " or use a longer corpus")


class _Sampler:
    """What both schemes share: sizes, rows, the epoch plan cache, step -> (epoch, index)."""

    kind = ""

    def __init__(self, ids, batch_size: int, num_steps: int, seed: int,
                 rows: tuple[int, int] | None = None):
        _check_positive(batch_size=batch_size, num_steps=num_steps)
        self.ids = _token_array(ids)
        self.batch_size, self.num_steps, self.seed = int(batch_size), int(num_steps), int(seed)
        self.rows = _check_rows(rows, self.batch_size)
        self.steps_per_epoch = self._count_steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise _too_short(self.kind, len(self.ids), self.batch_size, self.num_steps,
                             self._min_length())
        self._plan_epoch: int | None = None
        self._plan: np.ndarray | None = None

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        # Cached: the random scheme permutes all windows of an epoch, too dear to redo per step.
        if self._plan_epoch != epoch:
            self._plan = self._make_epoch_starts(_epoch_rng(self.seed, epoch))
            self._plan_epoch = epoch
        return self._plan

    def _locate(self, step: int) -> tuple[int, int]:
        if int(step) < 0:
            raise UsageError(f"step {step} must be >= 0")
        return divmod(int(step), self.steps_per_epoch)

    def epoch(self, step: int) -> int:
        return self._locate(step)[0]

    def starts(self, step: int) -> np.ndarray:
        """Where each of this process's rows of batch `step` starts in the token array: the
        whole batch in B integers, for samplers that cut windows on the device."""
        epoch, index = self._locate(step)
        return self._batch_starts(self._epoch_starts(epoch), index)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y int32 [rows, num_steps] of global batch number `step`."""
        return _windows(self.ids, self.starts(step), self.num_steps)


class RandomSampler(_Sampler):
    kind = "random"

    def _count_steps_per_epoch(self) -> int:
        # d2l: corpus[offset:], (len - 1) // T windows, // B batches; worst offset is T - 1.
        n, t = len(self.ids), self.num_steps
        return max(n - 1 - (t - 1), 0) // t // self.batch_size

    def _min_length(self) -> int:
        return (self.batch_size + 1) * self.num_steps

    def _make_epoch_starts(self, rng: np.random.Generator) -> np.ndarray:
        t = self.num_steps
        offset = int(rng.integers(0, t))  # random.randint(0, num_steps - 1)
        num_windows = (len(self.ids) - offset - 1) // t
        return offset + t * rng.permutation(num_windows)

    def _batch_starts(self, window_starts: np.ndarray, index: int) -> np.ndarray:
        first = index * self.batch_size
        return window_starts[first + self.rows[0]: first + self.rows[1]]

    def resets_state(self, step: int) -> bool:
        return True


class SequentialSampler(_Sampler):
    kind = "sequential"

    def _count_steps_per_epoch(self) -> int:
        # d2l: ((len - offset - 1) // B) tokens per stream, // T batches; worst offset is T.
        n, t = len(self.ids), self.num_steps
        return max(n - t - 1, 0) // self.batch_size // t

    def _min_length(self) -> int:
        return (self.batch_size + 1) * self.num_steps + 1

    def _make_epoch_starts(self, rng: np.random.Generator) -> np.ndarray:
        offset = int(rng.integers(0, self.num_steps + 1))  # random.randint(0, num_steps)
        stream_length = (len(self.ids) - offset - 1) // self.batch_size
        return offset + stream_length * np.arange(self.batch_size)

    def _batch_starts(self, stream_starts: np.ndarray, index: int) -> np.ndarray:
        return stream_starts[self.rows[0]: self.rows[1]] + index * self.num_steps

    def resets_state(self, step: int) -> bool:
        return self._locate(step)[1] == 0


def make_sampler(kind: str, ids, batch_size: int, num_steps: int, seed: int,
                 rows: tuple[int, int] | None = None) -> RandomSampler | SequentialSampler:
    samplers = {"random": RandomSampler, "sequential": SequentialSampler}
    if kind not in samplers:
        raise UsageError(f"unknown sampler {kind!r}; use one of {', '.join(SAMPLER_KINDS)}")
    return samplers[kind](ids, batch_size, num_steps, seed, rows)


@dataclass(frozen=True)
class EvalStreams:
    """How evaluation reads a split of `length` tokens: as `batch_size` contiguous streams (the
    first length % B one token longer) whose RNN state carries from one window of num_steps to
    the next; every token but the first of each stream is scored once."""

    starts: np.ndarray  # int64 [B]: each stream's first token
    targets: np.ndarray  # int64 [B]: tokens scored in each stream (its length - 1)
    num_windows: int  # windows of num_steps that cover the longest stream


def eval_streams(length: int, batch_size: int, num_steps: int) -> EvalStreams:
    """The streams of an evaluation over `length` tokens: O(B) numbers, whatever the length
    (the windows are cut on the device, deeprnn.training.device_batches.eval_windows)."""
    _check_positive(eval_batch_size=batch_size, num_steps=num_steps)
    n, b, t = int(length), int(batch_size), int(num_steps)
    if n < 2 * b:
        lower = " lower --eval_batch_size or" if b > 1 else ""
        raise UsageError(f"the evaluation text has {n} tokens, too short for eval batch_size={b}"
                         f" (each stream needs 2 tokens, so at least {2 * b});{lower} use a "
                         "larger held-out split")
    lengths = np.full(b, n // b)
    lengths[: n % b] += 1
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    targets = lengths - 1
    return EvalStreams(starts, targets, -(-int(targets.max()) // t))


def eval_batches(ids, batch_size: int,
                 num_steps: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The windows of eval_streams on the host, one at a time: x, y int32 and mask float32
    [B, T]; a stream that ends early is padded with mask 0, so the mask sums to
    len(ids) - batch_size over all windows. What the device cuts in eval_windows, written out
    for reading and for the tests that hold that to it (evaluation itself never builds them)."""
    ids = _token_array(ids)
    streams = eval_streams(len(ids), batch_size, num_steps)
    t = int(num_steps)

    def generate():
        for window in range(streams.num_windows):
            column = window * t + np.arange(t)
            scored = column[None, :] < streams.targets[:, None]
            position = np.where(scored, streams.starts[:, None] + column[None, :], 0)
            yield (np.where(scored, ids[position], 0).astype(np.int32),
                   np.where(scored, ids[position + 1], 0).astype(np.int32),
                   scored.astype(np.float32))

    return generate()
