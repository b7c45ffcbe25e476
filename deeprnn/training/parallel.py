"""Data parallelism over every device of every process, and the multi-host start.

The per-device steps (train_step.py) are written once with a named device axis, AXIS: the
gradients are averaged across it before clipping and the metrics summed. This module maps them:

    shard_map  jax.jit over jax.shard_map on a 1-D mesh of all devices (the default, and the
               fastest form measured): parameters replicated, batch rows and carry sharded.
    pmap       jax.pmap over this process's devices, a leading device axis on every value.

The global batch of B rows is cut into one contiguous block of rows per process (the samplers
build only that block, `rows()`), and each process's block into one block per device. So N
processes with D devices each compute exactly what one process with N * D devices would, and
the same sums as one device up to floating-point reduction order.

State and carry live on the devices in a mode-specific layout between steps. `logical()` gives
them as one device would hold them (global arrays, no device axis: what checkpoints store and
what generation reads), and `from_logical()` puts them back, on any device count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deeprnn.config import check_choice
from deeprnn.errors import UsageError
from deeprnn.limits import check_multihost
from deeprnn.training import device_batches

AXIS = "data"  # the device axis that the steps' collectives name


def _process_ordered(devices: Sequence[jax.Device]) -> list[jax.Device]:
    # Each process's devices must form one contiguous block of the mesh, so that its rows of
    # the global batch are contiguous too (what the samplers' rows=(start, stop) can build).
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def _unaliased(tree):
    """The tree with every leaf its own object, so that placing it gives every leaf its own
    buffer: the train step donates state and carry, and XLA refuses one buffer donated twice
    (init_carry's LSTM (c, h) are one zeros array)."""
    seen: set[int] = set()

    def own(leaf):
        if id(leaf) in seen:
            if isinstance(leaf, jax.Array):
                return jax.device_put(leaf, leaf.sharding, may_alias=False)
            return np.array(leaf, copy=True)
        seen.add(id(leaf))
        return leaf
    return jax.tree.map(own, tree)


def _to_host(leaf) -> np.ndarray:
    """A leaf as numpy; typed PRNG keys go as their raw key data."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


class DataParallel:
    """Runs train/eval steps over every device; the global batch is split along rows.

    `devices` (default: all devices of all processes) lets tests run one process on a subset.
    """

    def __init__(self, mode: str = "shard_map", devices: Sequence[jax.Device] | None = None):
        check_choice("parallel", mode)
        self.mode = mode
        self.devices = _process_ordered(devices if devices is not None else jax.devices())
        self.num_devices = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.num_processes = len({d.process_index for d in self.devices})
        if self.num_devices != self.num_processes * len(self.local_devices):
            raise UsageError("every process must bring the same number of devices; start each "
                             "process with the same device count")
        self._replicated = NamedSharding(self.mesh, P())
        self._by_row = NamedSharding(self.mesh, P(AXIS))
        # pmap: this process's devices in mesh order, so device i of the map holds row block i.
        self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

    # -- rows ------------------------------------------------------------------------------
    def rows(self, batch_size: int, flag: str = "batch_size") -> tuple[int, int]:
        """This process's rows [start, stop) of a global batch of `batch_size` rows.

        UsageError (naming --`flag`) unless the batch divides by the global device count.
        """
        if batch_size % self.num_devices:
            raise UsageError(
                f"--{flag}={batch_size} must divide by the {self.num_devices} devices (it is "
                f"the global batch, split evenly); use a multiple of {self.num_devices}")
        blocks = self._by_row.addressable_devices_indices_map((batch_size,)).values()
        start = min(b[0].start or 0 for b in blocks)
        stop = max(b[0].stop if b[0].stop is not None else batch_size for b in blocks)
        return start, stop

    def _global_rows(self, local_rows: int) -> int:
        return local_rows * self.num_processes

    # -- placing values --------------------------------------------------------------------
    def _put(self, leaf, sharding: NamedSharding, global_shape: tuple[int, ...]):
        """A global array from this process's part of it (all of it when replicated)."""
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        typed_key = (isinstance(leaf, jax.Array)
                     and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))
        if self.num_processes == 1:  # device to device, no trip through the host
            # A copy, never an alias: the steps donate what this returns, and the caller's
            # logical arrays must outlive that.
            return jax.device_put(leaf, sharding, may_alias=False)
        host = _to_host(leaf)
        if typed_key:
            global_shape = global_shape + host.shape[len(global_shape):]
        out = jax.make_array_from_process_local_data(sharding, host, global_shape)
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(leaf)) if typed_key else out

    def _stack_local(self, leaf):
        """[n_local, *shape]: a copy per local device, for pmap's leading device axis."""
        host = _to_host(leaf)
        stacked = np.broadcast_to(host, (len(self.local_devices), *host.shape))
        # may_alias=False: a CPU device may otherwise share the host memory, which two leaves
        # could hold in common (see _unaliased).
        return jax.device_put(stacked, NamedSharding(self._local_mesh, P(AXIS)), may_alias=False)

    def _split_local(self, leaf):
        """[local_rows, ...] -> [n_local, local_rows / n_local, ...] on this process's devices."""
        n = len(self.local_devices)
        if leaf.shape[0] % n:
            raise UsageError(f"{leaf.shape[0]} rows do not split over {n} local devices; use a "
                             "batch size that divides by the device count")
        host = _to_host(leaf)
        return jax.device_put(host.reshape(n, -1, *host.shape[1:]),
                              NamedSharding(self._local_mesh, P(AXIS)), may_alias=False)

    def replicate(self, tree):
        """Puts a logical pytree (state, params) on every device."""
        if self.mode == "pmap":
            return jax.tree.map(self._stack_local, tree)
        return jax.tree.map(lambda x: self._put(x, self._replicated, np.shape(x)),
                            _unaliased(tree))

    def shard_rows(self, carry):
        """Splits a carry of this process's rows (axis 0 of each leaf) across its devices."""
        if self.mode == "pmap":
            return jax.tree.map(self._split_local, carry)

        def shard(leaf):
            shape = np.shape(leaf)
            if shape[0] % len(self.local_devices):
                raise UsageError(f"{shape[0]} rows do not split over {len(self.local_devices)} "
                                 "local devices; use a batch size that divides by the device "
                                 "count")
            return self._put(leaf, self._by_row, (self._global_rows(shape[0]), *shape[1:]))
        return jax.tree.map(shard, _unaliased(carry))

    def _local_rows_of(self, leaf) -> np.ndarray:
        """This process's rows of a global (logical) carry leaf, as numpy."""
        start, stop = self.rows(leaf.shape[0])
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            parts = sorted((s.index[0].start or 0, np.asarray(s.data))
                           for s in leaf.addressable_shards if s.replica_id == 0)
            host = np.concatenate([p for _, p in parts])
            return host[start - parts[0][0]: stop - parts[0][0]]
        return _to_host(leaf)[start:stop]

    def from_logical(self, state, carry):
        """The inverse of `logical`: a logical state and global carry placed for the steps.

        Works whatever device count wrote them (a checkpoint from another machine).
        """
        if self.mode == "shard_map" and self.num_processes == 1:
            for leaf in jax.tree.leaves(carry):
                self.rows(leaf.shape[0])  # a clear error when the rows do not split
            carry = jax.tree.map(lambda x: jax.device_put(x, self._by_row, may_alias=False),
                                 _unaliased(carry))
        else:
            carry = self.shard_rows(jax.tree.map(self._local_rows_of, carry))
        return self.replicate(state), carry

    def logical(self, state, carry):
        """The state and carry as one device would hold them (what checkpoints store).

        Global arrays: the state replicated, the carry all rows of the global batch (sharded by
        row). Under shard_map that is the layout the steps already use.
        """
        if self.mode == "shard_map":
            return state, carry

        def one_copy(leaf):  # device 0's copy of a replicated value
            return self._put(np.asarray(leaf.addressable_shards[0].data)[0], self._replicated,
                             leaf.shape[1:])

        def all_rows(leaf):  # [n_local, r, ...] -> this process's rows -> the global carry
            shards = sorted((s.index[0].start or 0, np.asarray(s.data))
                            for s in leaf.addressable_shards)
            local = np.concatenate([data for _, data in shards]).reshape(-1, *leaf.shape[2:])
            return self._put(local, self._by_row, (self._global_rows(local.shape[0]),
                                                   *local.shape[1:]))
        return jax.tree.map(one_copy, state), jax.tree.map(all_rows, carry)

    def on_one_device(self, tree):
        """This process's own copy of a replicated logical tree (params), on its first device.

        For work one device does alone, such as generating a sample: a global array would run
        it on every device of every process, and on process 0 alone it would wait for them.
        """
        def local(leaf):
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return leaf.addressable_shards[0].data
            return jax.device_put(leaf, self.local_devices[0])
        return jax.tree.map(local, tree)

    # -- compiled steps --------------------------------------------------------------------
    def _global_batch(self, array: np.ndarray, row_axis: int):
        """This process's rows (numpy) -> one global array sharded along `row_axis`."""
        shape = list(array.shape)
        shape[row_axis] = self._global_rows(shape[row_axis])
        spec = P(*([None] * row_axis), AXIS)
        return self._put(np.asarray(array), NamedSharding(self.mesh, spec), tuple(shape))

    def compile_train(self, train_steps_fn, ids, num_steps: int):
        """fn(state, starts, carry, resets) with starts int32 [k, local_rows] (the samplers'
        window starts of k steps) and resets [k] -> (state, carry, metrics [k]); state and
        carry are donated. The token array `ids` [N] is placed on every device once, here, and
        each device cuts its own rows' windows from it (device_batches.py)."""
        step = functools.partial(device_batches.on_device_windows(train_steps_fn, num_steps),
                                 axis_name=AXIS)
        ids = device_batches.token_array(ids, num_steps)
        if self.mode == "pmap":
            mapped = jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 1, 0, None),
                              out_axes=(0, 0, None), donate_argnums=(0, 3),
                              devices=self.local_devices if self.num_processes == 1 else None)
            n = len(self.local_devices)
            device_ids = self._stack_local(ids)

            def run_pmap(state, starts, carry, resets):
                k, rows = np.shape(starts)
                return mapped(state, device_ids, np.reshape(starts, (k, n, rows // n)), carry,
                              np.asarray(resets))
            return run_pmap

        # check_vma=False: the step pmeans gradients of replicated parameters itself; with the
        # varying-axis check on, JAX would already sum them across devices in the transpose,
        # and the pmean would keep that sum (D times the mean gradient).
        mapped = jax.jit(jax.shard_map(
            step, mesh=self.mesh, in_specs=(P(), P(), P(None, AXIS), P(AXIS), P()),
            out_specs=(P(), P(AXIS), P()), check_vma=False), donate_argnums=(0, 3))
        device_ids = self._put(ids, self._replicated, ids.shape)

        def run(state, starts, carry, resets):
            resets = np.asarray(resets)
            return mapped(state, device_ids, self._global_batch(np.asarray(starts, np.int32), 1),
                          carry, self._put(resets, self._replicated, resets.shape))
        return run

    def compile_eval(self, eval_step_fn) -> device_batches.CompiledEval:
        """Evaluation windows cut on every device (device_batches.eval_windows): the split's
        ids on every device (`put_ids`, once per split), this process's streams' positions and
        ends [local_rows, ...] split by rows, the sums added up across devices and the same on
        all; params from `replicate`, carry from `shard_rows`."""
        chunk = functools.partial(device_batches.eval_windows,
                                  eval_step_fn=functools.partial(eval_step_fn, axis_name=AXIS))
        if self.mode == "pmap":
            mapped = jax.pmap(chunk, axis_name=AXIS, in_axes=(0, 0, 0, 0, None, 0, None),
                              out_axes=(0, None),
                              devices=self.local_devices if self.num_processes == 1 else None)
            n = len(self.local_devices)

            def run_pmap(params, ids, positions, ends, windows, carry, sums):
                def split(a):
                    return np.reshape(a, (n, -1, *np.shape(a)[1:]))
                return mapped(params, ids, split(positions), split(ends), windows, carry,
                              device_batches.zero_sums() if sums is None else sums)
            return device_batches.CompiledEval(put_ids=self._stack_local, run=run_pmap)

        mapped = jax.jit(jax.shard_map(
            chunk, mesh=self.mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(), P(AXIS), P()),
            out_specs=(P(AXIS), P())))

        def replicated(array):
            return self._put(array, self._replicated, np.shape(array))

        def run(params, ids, positions, ends, windows, carry, sums):
            if sums is None:
                sums = jax.tree.map(replicated, device_batches.zero_sums())
            return mapped(params, ids, self._global_batch(positions, 0),
                          self._global_batch(ends, 0), replicated(windows), carry, sums)
        return device_batches.CompiledEval(put_ids=replicated, run=run)


def start_multihost(multihost: bool, coordinator_address: str = "", num_processes: int = 0,
                    process_id: int = -1) -> None:
    """jax.distributed.initialize(), once, before any other JAX call of the run.

    On Cloud TPU every argument comes from the environment; elsewhere pass all three
    (deeprnn.limits.check_multihost, which the programs also call before JAX loads).
    """
    check_multihost(multihost, coordinator_address, num_processes, process_id)
    if not multihost or jax.distributed.is_initialized():
        return
    if not coordinator_address:  # the environment's: Cloud TPU, SLURM, Open MPI, ...
        try:
            jax.distributed.initialize()
        except ValueError as err:  # JAX found no cluster: "coordinator_address should be ..."
            said = " ".join(str(err).split())
            raise UsageError("--multihost found no cluster in this environment to join (JAX "
                             f"says: {said}); outside Cloud TPU pass --coordinator_address="
                             "HOST:PORT --num_processes=N --process_id=I") from err
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
