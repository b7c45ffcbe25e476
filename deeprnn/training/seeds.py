"""Many seeds in one program (`--num_seeds=K`).

K independently initialised copies of the model, each with its own data order (seed + k),
train as one vmapped step: a small model that leaves an accelerator idle fills it K times over,
and the spread over seeds comes with every run. Every seed is clipped and updated on its own
(the optimizer is vmapped with the step), so seed k's numbers equal a run with --seed=seed+k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deeprnn.errors import UsageError
from deeprnn.training import device_batches


def seed_values(seed: int, num_seeds: int) -> list[int]:
    return [seed + k for k in range(num_seeds)]


def stack(trees):
    """One pytree with a leading seed axis from K pytrees of the same structure."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def select(tree, k: int):
    """Seed k's slice of a stacked pytree."""
    return jax.tree.map(lambda a: a[k], tree)


def vmap_train_steps(train_steps_fn, num_steps: int):
    """train_steps over seeds, on windows cut on the device (device_batches.py): state/carry
    [K, ...], the token array [N] shared, window starts [steps, K, B] (each seed's own data
    order), resets [steps] shared (every seed's sampler has the same epoch length)
    -> metrics [steps, K]."""
    return jax.vmap(device_batches.on_device_windows(train_steps_fn, num_steps),
                    in_axes=(0, None, 1, 0, None), out_axes=(0, 0, 1))


class SeedStack:
    """The DataParallel interface (parallel.py) for K stacked seeds on one device.

    States, params and carries carry a leading seed axis; window starts come as
    [steps, K, B].
    """

    def __init__(self, num_seeds: int):
        if jax.device_count() > 1:
            raise UsageError(f"--num_seeds={num_seeds} runs every seed on one device, but "
                             f"{jax.device_count()} are visible; show one (e.g. "
                             "CUDA_VISIBLE_DEVICES=0) or use --num_seeds=1 for data parallelism")
        self.num_seeds = num_seeds
        self.num_devices = 1

    def rows(self, batch_size: int, flag: str = "batch_size") -> tuple[int, int]:
        return 0, batch_size

    def compile_train(self, train_steps_fn, ids, num_steps: int):
        """fn(state, starts [k, K, B], carry, resets [k]); see DataParallel.compile_train."""
        mapped = jax.jit(vmap_train_steps(train_steps_fn, num_steps), donate_argnums=(0, 3))
        device_ids = jnp.asarray(device_batches.token_array(ids, num_steps))

        def run(state, starts, carry, resets):
            return mapped(state, device_ids, starts, carry, resets)
        return run

    def compile_eval(self, eval_step_fn) -> device_batches.CompiledEval:
        """device_batches.eval_windows over seeds: params, carry and sums [K, ...], the same
        windows of the same split for every seed."""
        mapped = jax.jit(jax.vmap(
            functools.partial(device_batches.eval_windows, eval_step_fn=eval_step_fn),
            in_axes=(0, None, None, None, None, 0, 0)))

        def run(params, ids, positions, ends, windows, carry, sums):
            if sums is None:
                sums = device_batches.zero_sums((self.num_seeds,))
            return mapped(params, ids, positions, ends, windows, carry, sums)
        return device_batches.CompiledEval(put_ids=jnp.asarray, run=run)

    def replicate(self, tree):
        return tree

    def shard_rows(self, carry):
        """A fresh carry for one seed -> the same zeros for every seed."""
        return jax.tree.map(lambda c: jnp.stack([c] * self.num_seeds), carry)

    def from_logical(self, state, carry):
        return state, jax.tree.map(lambda a: jnp.array(a, copy=True), carry)

    def logical(self, state, carry):
        return state, carry

    def on_one_device(self, tree):
        """Seed 0's copy (generation samples from the first seed)."""
        return select(tree, 0)
