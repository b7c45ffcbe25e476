"""Whether a run fits in its device's memory, found before anything is allocated.

An impossible model (`--num_hiddens=100000000`) used to run for 106 s and end in an
out-of-memory traceback. Here its state is sized from shapes alone (jax.eval_shape) and, when
it is large enough to matter, the training call is compiled against abstract arguments and
XLA's memory analysis of it (arguments + outputs + temporaries - what is donated) is compared
with the device's memory; a run that does not fit is refused with both numbers.

Small runs, the book's among them, cost nothing: the compiled check runs only when the state
alone takes more than COMPILE_CHECK_FRACTION of the device. The estimate is for one device's
share (parameters replicated, its rows of the batch); K stacked seeds count K times.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from deeprnn.config import RunConfig
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model
from deeprnn.model.config import ModelConfig
from deeprnn.training.device_batches import make_resident_multi_step
from deeprnn.training.optimizer import make_optimizer

COMPILE_CHECK_FRACTION = 0.05


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """What XLA may allocate on the device: its allocator's limit on accelerators; on a CPU
    the machine's physical memory."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_call_bytes(config: RunConfig, model_config: ModelConfig, state, carry,
                        num_tokens: int, rows: int) -> int:
    """XLA's memory total for one device's training call (`rows` of the batch), compiled
    against abstract arguments."""
    model = build_model(model_config)
    tx = make_optimizer(config.optimizer, config.lr, config.clip_norm,
                        skip_nonfinite=config.nan_policy == "skip")
    call = make_resident_multi_step(model.apply, tx, config.num_steps)

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    carry = jax.tree.map(lambda x: abstract((rows, *x.shape[1:]), x.dtype), carry)
    state = jax.tree.map(lambda x: abstract(x.shape, x.dtype), state)
    per_call = config.steps_per_call
    compiled = call.lower(state, abstract((num_tokens,), np.int32),
                          abstract((per_call, rows), np.int32), carry,
                          abstract((per_call,), np.bool_)).compile()
    memory = compiled.memory_analysis()
    if memory is None:  # a backend without the analysis: the state alone is the floor
        return _nbytes(state) + _nbytes(carry)
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def check_fits(config: RunConfig, model_config: ModelConfig, state, carry, *,
               num_tokens: int, rows: int, available: int | None = None) -> None:
    """UsageError unless one device's training call fits in `available` bytes (default: the
    device's memory). `state` and `carry` are abstract (one seed; carry of the whole batch)."""
    available = device_memory_bytes() if available is None else available
    floor = 2 * _nbytes(state) * config.num_seeds  # the state, and as much again in gradients
    advice = "lower --num_hiddens, --num_layers or --batch_size"
    if floor > available:
        raise UsageError(f"the model needs at least {_gib(floor)} per device (parameters, "
                         f"optimizer state, gradients), and the device has {_gib(available)}; "
                         f"{advice}")
    if floor < COMPILE_CHECK_FRACTION * available:
        return
    needed = compiled_call_bytes(config, model_config, state, carry, num_tokens,
                                 rows) * config.num_seeds
    if needed > available:
        raise UsageError(f"one training call needs {_gib(needed)} per device (XLA's memory "
                         f"analysis of the compiled step), and the device has {_gib(available)};"
                         f" {advice}, or --steps_per_call")
