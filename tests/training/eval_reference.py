"""Evaluation as it was before it moved onto the devices, kept as the reference the compiled
loop must equal: the host cuts every [B, T] window (samplers.eval_batches) and calls a compiled
eval step per window, adding the sums on the device in window order.

Shared by tests/training/test_evaluation.py (one device, stacked seeds) and the 8-device worker
(tests/training/parallel_worker.py)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from deeprnn.data.samplers import eval_batches
from deeprnn.training.parallel import AXIS, DataParallel
from deeprnn.training.train_step import eval_step


def one_device_step(apply_fn):
    return jax.jit(functools.partial(eval_step, apply_fn=apply_fn))


def seeds_step(apply_fn):
    """Params and carry [K, ...], the same batch for every seed."""
    return jax.jit(jax.vmap(functools.partial(eval_step, apply_fn=apply_fn),
                            in_axes=(0, None, None, None, 0)))


def data_parallel_step(dp: DataParallel, apply_fn):
    """fn(params, x, y, mask, carry) over every device of `dp`, x/y/mask [local_rows, T]."""
    step = functools.partial(eval_step, apply_fn=apply_fn, axis_name=AXIS)
    if dp.mode == "pmap":
        mapped = jax.pmap(step, axis_name=AXIS, out_axes=(0, None),
                          devices=dp.local_devices if dp.num_processes == 1 else None)
        n = len(dp.local_devices)

        def run_pmap(params, x, y, mask, carry):
            def split(a):
                return np.reshape(a, (n, -1, *np.shape(a)[1:]))
            return mapped(params, split(x), split(y), split(mask), carry)
        return run_pmap
    mapped = jax.jit(jax.shard_map(step, mesh=dp.mesh,
                                   in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS)),
                                   out_specs=(P(AXIS), P())))

    def run(params, x, y, mask, carry):
        return mapped(params, *(dp._global_batch(a, 0) for a in (x, y, mask)), carry)
    return run


def reference_sums(step_fn, params, ids, *, batch_size: int, num_steps: int,
                   rows: tuple[int, int], carry) -> tuple[np.ndarray, np.ndarray]:
    """(loss_sum, tokens) of the split, one step_fn call per window."""
    start, stop = rows
    loss_sum, tokens = 0.0, 0.0
    for x, y, mask in eval_batches(ids, batch_size, num_steps):
        carry, metrics = step_fn(params, x[start:stop], y[start:stop], mask[start:stop], carry)
        loss_sum, tokens = loss_sum + metrics["loss_sum"], tokens + metrics["tokens"]
    return tuple(np.asarray(a, float) for a in jax.device_get((loss_sum, tokens)))
