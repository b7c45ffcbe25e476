"""Training steps and evaluation windows cut on the device from a resident token array.

At the d2l shape a step is short (about 1 ms on a GPU), so per-call dispatch and host
transfers cost as much as the step itself. `train_step.train_steps` already runs several
steps per call (the training loop's --steps_per_call); here the whole token array also lives
on the device and each call receives only the window starts [S, B] computed from the
sampler's (seed, step), so S * B integers cross from the host per call instead of 2 * S * B * T,
and the host does no per-step slicing. The training program (through parallel.py and
seeds.py) and the benchmark's `fused` rows both run this way, so the benchmark times the
step that training runs.

Evaluation reads a whole held-out split (5M characters for text8 and enwik8) once, window after
window with the RNN state carried. `eval_windows` scores K consecutive windows in one call (a
lax.scan), cutting each window from the split's ids resident on the device: the host sends a
few window numbers per call and never builds [B, T] arrays of the split, so its memory does not
grow with the split, and the device holds one window's activations at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeprnn.errors import UsageError
from deeprnn.training.train_step import train_steps

METRIC_SUMS = ("loss_sum", "tokens")


def gather_windows(ids, starts, num_steps: int):
    """x[s, b] = ids[starts[s, b] : + T], y the same shifted by one token (on the device)."""
    window = ids[starts[..., None] + jnp.arange(num_steps + 1)]
    return window[..., :-1], window[..., 1:]


def token_array(ids, num_steps: int) -> np.ndarray:
    """The training text as the int32 array the devices hold. Window starts and the gather's
    indices are int32 on the device, and JAX clamps an out-of-range gather without an error,
    so a text too long for int32 indices is refused here rather than trained on wrongly."""
    ids = np.asarray(ids)
    if len(ids) + num_steps + 1 >= 2**31:
        raise UsageError(f"the training text has {len(ids):,} tokens, more than int32 window "
                         "indices reach on the device; train on a shorter text (fewer or "
                         "smaller corpora, or --max_tokens)")
    return np.asarray(ids, dtype=np.int32)  # no copy of int32 ids (360 MB for text8's train)


def on_device_windows(train_steps_fn: Callable, num_steps: int) -> Callable:
    """train_steps_fn(state, xs, ys, carry, resets, **kw) -> fn(state, ids, starts, carry,
    resets, **kw), cutting xs, ys [S, ..., T] from ids [N] at starts [S, ...] on the device."""
    def run(state, ids, starts, carry, resets, **kwargs):
        xs, ys = gather_windows(ids, starts, num_steps)
        return train_steps_fn(state, xs, ys, carry, resets, **kwargs)
    return run


def make_resident_multi_step(apply_fn: Callable, tx: optax.GradientTransformation,
                             num_steps: int) -> Callable:
    """jitted (state, ids int32 [N] on the device, starts int32 [S, B], carry, resets bool [S])
    -> (state, carry, metrics stacked [S]); the state and carry buffers are donated."""
    run_steps = functools.partial(train_steps, apply_fn=apply_fn, tx=tx)
    return jax.jit(on_device_windows(run_steps, num_steps), donate_argnums=(0, 3))


def sampler_starts(sampler, first_step: int, count: int) -> np.ndarray:
    """Window starts [count, rows] of steps first_step.. (the windows sampler.batch cuts)."""
    return np.stack([sampler.starts(step)
                     for step in range(first_step, first_step + count)]).astype(np.int32)


def zero_sums(shape: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Evaluation sums before the first window ([K] for K stacked seeds)."""
    return {k: np.zeros(shape, np.float32) for k in METRIC_SUMS}


def eval_windows(params, ids, positions, ends, windows, carry, sums, *,
                 eval_step_fn: Callable):
    """Scores windows `windows` [K] of this device's evaluation streams in one call.

    ids [N]: the split on the device (zeros after its end are never scored); positions
    [rows, T]: the tokens window 0 of each stream reads (its start + 0..T-1); ends [rows]: one
    past the last input position scored in each stream (start + targets,
    deeprnn.data.samplers.eval_streams). Window w reads positions + w * T; a position at or past
    its stream's end is masked, as samplers.eval_batches pads it, so windows past the last
    score nothing. `sums` {"loss_sum", "tokens"} are added to window by window, in order, as
    the host loop that scored one window per call added them. Returns (carry, sums).
    """
    num_steps = positions.shape[1]

    def one(carried, window):
        carry, sums = carried
        position = positions + window * num_steps  # [rows, T]
        scored = position < ends[:, None]
        position = jnp.where(scored, position, 0)
        x = jnp.where(scored, ids[position], 0)
        y = jnp.where(scored, ids[position + 1], 0)
        carry, metrics = eval_step_fn(params, x, y, scored.astype(jnp.float32), carry)
        return (carry, {k: sums[k] + metrics[k] for k in METRIC_SUMS}), None

    (carry, sums), _ = jax.lax.scan(one, (carry, sums), windows)
    return carry, sums


@dataclasses.dataclass(frozen=True)
class CompiledEval:
    """An evaluation program for some devices (what compile_eval returns).

    put_ids(ids [N]) places a split's token ids where the program reads them, once per split;
    run(params, ids, positions, ends, windows, carry, sums) -> (carry, sums) scores the windows
    `windows` [K] of this process's streams (eval_windows); sums=None starts from zero.
    """

    put_ids: Callable
    run: Callable


def one_device_eval(eval_step_fn: Callable) -> CompiledEval:
    """eval_windows compiled for the default device."""
    mapped = jax.jit(functools.partial(eval_windows, eval_step_fn=eval_step_fn))

    def run(params, ids, positions, ends, windows, carry, sums):
        return mapped(params, ids, positions, ends, windows, carry,
                      zero_sums() if sums is None else sums)
    return CompiledEval(put_ids=jnp.asarray, run=run)
