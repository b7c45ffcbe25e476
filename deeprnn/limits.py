"""Limits of the integer flags and the multi-host flags' checks, shared by every program that
takes them (train through RunConfig, generate and evaluate through their own flags).

absl takes integers of any size; past int64 they crashed deep inside NumPy or JAX with an
OverflowError, and far below that a size only burns memory before the memory check speaks.
The multi-host flags went to jax.distributed.initialize unchecked (a ValueError or IndexError
from inside JAX). Each bad value here is one UsageError naming the flag and the fix. Like
deeprnn.config, this module imports no other deeprnn module but deeprnn.errors.
"""

from __future__ import annotations

import re

from deeprnn.errors import UsageError

# Upper bounds of the integer flags. Step and token counts: the step counter and token
# positions on the device are int32. Sizes: far above anything that fits on a device, low
# enough that their products (parameter and activation counts) stay exact in int64.
SEED_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
GENERATE_MAX = 10**6  # characters one sample or `generate --length` emits
UPPER_BOUNDS = {
    "num_hiddens": 2**27, "num_layers": 1024, "num_seeds": 1024,
    "batch_size": 2**24, "eval_batch_size": 2**24, "num_steps": 2**24,
    "steps_per_call": 2**20, "sample_length": GENERATE_MAX, "num_processes": 2**16,
    **dict.fromkeys(("max_tokens", "num_epochs", "num_train_steps", "warmup_steps", "log_every",
                     "eval_every", "sample_every", "checkpoint_every", "max_to_keep"),
                    INT32_MAX),
}


def check_at_most(name: str, value: int, bound: int | None = None) -> None:
    """UsageError when --name=value is above its bound (UPPER_BOUNDS[name] by default)."""
    bound = UPPER_BOUNDS[name] if bound is None else bound
    if value > bound:
        raise UsageError(f"--{name}={value} is too large; give at most {bound}")


def check_seed(value: int, name: str = "seed") -> None:
    """Seeds are 0..SEED_MAX: JAX's PRNGKey keeps 32 bits, so any other seed repeats one."""
    if not 0 <= value <= SEED_MAX:
        raise UsageError(f"--{name}={value} is out of range; give a seed in [0, {SEED_MAX}] "
                         "(JAX's PRNG keeps 32 bits: any other seed repeats one of these)")


_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})$")  # host:port, [v6]:port


def check_multihost(multihost: bool, coordinator_address: str, num_processes: int,
                    process_id: int) -> None:
    """The multi-host flags, shared by every program that takes them (train, evaluate), before
    anything is started: jax.distributed.initialize raised ValueError or IndexError on them.
    Outside Cloud TPU all three are given; on it none (the environment has them)."""
    given = [f"--{name}={value}" for name, value, unset in (
        ("coordinator_address", coordinator_address, ""), ("num_processes", num_processes, 0),
        ("process_id", process_id, -1)) if value != unset]
    if not multihost:
        if given:
            raise UsageError(f"{' '.join(given)} applies only with --multihost; add "
                             "--multihost to run as one of several processes, or drop it")
        return
    if not given:
        return
    if len(given) < 3:
        raise UsageError("--multihost outside Cloud TPU needs all of --coordinator_address, "
                         "--num_processes and --process_id (on Cloud TPU, none of them)")
    match = _ADDRESS.match(coordinator_address)
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise UsageError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT; give "
                         "process 0's host and a free port, e.g. 10.0.0.2:12345")
    if not 1 <= num_processes <= UPPER_BOUNDS["num_processes"]:
        raise UsageError(f"--num_processes={num_processes} must be in [1, "
                         f"{UPPER_BOUNDS['num_processes']}]: the number of processes started")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process_id={process_id} must be in [0, {num_processes - 1}]: "
                         f"processes are numbered from 0 to --num_processes minus 1")
