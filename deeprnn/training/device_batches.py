"""Training steps whose batches are cut on the device from a resident token array.

At the d2l shape a step is short (about 1 ms on a GPU), so per-call dispatch and host
transfers cost as much as the step itself. `train_step.train_steps` already runs several
steps per call (the training loop's --steps_per_call); here the whole token array also lives
on the device and each call receives only the window starts [S, B] computed from the
sampler's (seed, step), so S * B integers cross from the host per call instead of 2 * S * B * T,
and the host does no per-step slicing. The training program (through parallel.py and
seeds.py) and the benchmark's `fused` rows both run this way, so the benchmark times the
step that training runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeprnn.errors import UsageError
from deeprnn.training.train_step import train_steps


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
    return ids.astype(np.int32)


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
