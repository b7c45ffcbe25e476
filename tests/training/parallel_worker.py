"""Subprocess side of tests/training/test_parallel.py: training on many (simulated) devices.

The device count is fixed when JAX starts (XLA_FLAGS=--xla_force_host_platform_device_count),
so the test process (one device) starts this script and reads the JSON it writes:

    python tests/parallel_worker.py devices OUT.json CKPT_DIR
        on every device of this process: 1-device references, both samplers under shard_map and
        pmap, evaluation, generation, batch-size errors, and checkpoints in both directions;
        then a run of the training program to its step-10 checkpoint in CKPT_DIR/trainer_on_8
        (on CKPT_DIR/corpus.txt).
    python tests/parallel_worker.py multihost OUT.json CKPT_DIR ADDRESS NUM_PROCESSES PROCESS_ID
        one of several processes that train together (jax.distributed); each saves into and
        resumes from CKPT_DIR/from_processes.
CKPT_DIR holds the initial state (`save_fresh_state`), written by the test process.

The setup functions are shared with the test process, which runs the 1-device side of the
checkpoint round trips.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from deeprnn.data.samplers import make_sampler
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.generation import generate
from deeprnn.model.stack import init_carry
from deeprnn.run.checkpoints import RunCheckpoints
from deeprnn.training.device_batches import sampler_starts
from deeprnn.training.evaluation import evaluate_ids
from deeprnn.training.optimizer import make_optimizer
from deeprnn.training.parallel import DataParallel, start_multihost
from deeprnn.training.train_step import TrainState, eval_step, summarize, train_steps
from tests.training import eval_reference

BATCH, NUM_STEPS, EVAL_BATCH = 8, 6, 8
NUM_TRAIN_STEPS, CHECKPOINT_STEP, STEPS_PER_CALL = 20, 10, 5
SAMPLERS = ("random", "sequential")
MODES = ("shard_map", "pmap")
MODEL = ModelConfig(vocab_size=11, num_hiddens=16, num_layers=2, cell="lstm")


def token_ids(n: int, seed: int) -> np.ndarray:
    # A noisy counting sequence: learnable, so the loss moves, and no two windows are alike.
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) % (MODEL.vocab_size - 1)) + 1
    noise = rng.random(n) < 0.2
    ids[noise] = rng.integers(1, MODEL.vocab_size, noise.sum())
    return ids.astype(np.int32)


TRAIN_IDS, EVAL_IDS = token_ids(700, 0), token_ids(200, 1)


@functools.cache
def model_and_optimizer():
    # A small learning rate keeps 20 steps well conditioned. The global gradient norm is about
    # 0.17 and a one-device norm about 0.45: clipping at 0.3 catches a clip before the average
    # and a sum where the mean belongs.
    return build_model(MODEL), make_optimizer("sgd", 0.1, 0.3)


def _initial_state():
    model, tx = model_and_optimizer()
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(0))
    params = init_params(MODEL, init_key)
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                            opt_state=tx.init(params), rng=dropout_key)


_FRESH: dict = {}
FRESH_STATE_FILE = "fresh_state.npz"


def fresh_state():
    """The initial logical TrainState (numpy leaves: built once, never donated)."""
    if "state" not in _FRESH:
        _FRESH["state"] = jax.device_get(_initial_state())
    return _FRESH["state"]


def save_fresh_state(directory: str) -> None:
    """Workers load the test process's initial state instead of compiling the init again."""
    np.savez(f"{directory}/{FRESH_STATE_FILE}", *jax.tree.leaves(fresh_state()))


def load_fresh_state(directory: str) -> None:
    treedef = jax.tree.structure(jax.eval_shape(_initial_state))
    with np.load(f"{directory}/{FRESH_STATE_FILE}") as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    _FRESH["state"] = jax.tree.unflatten(treedef, leaves)


def train_steps_fn():
    model, tx = model_and_optimizer()
    return functools.partial(train_steps, apply_fn=model.apply, tx=tx)


def compile_train(dp: DataParallel):
    return dp.compile_train(train_steps_fn(), TRAIN_IDS, NUM_STEPS)


def reference_train_fn():
    """One device, no device axis at all, windows cut on the host (the samplers' own `batch`):
    the plain jitted step, taking the same (state, starts, carry, resets) as the parallel ones."""
    step = jax.jit(train_steps_fn())

    def run(state, starts, carry, resets):
        windows = np.asarray([[TRAIN_IDS[b:b + NUM_STEPS + 1] for b in step_starts]
                              for step_starts in starts])
        return step(state, windows[..., :-1], windows[..., 1:], carry, resets)
    return run


def train(run_fn, sampler, state, carry, first: int, last: int):
    """Steps [first, last) in calls of STEPS_PER_CALL; returns state, carry, per-step losses."""
    losses = []
    for start in range(first, last, STEPS_PER_CALL):
        window = range(start, min(start + STEPS_PER_CALL, last))
        starts = sampler_starts(sampler, start, len(window))
        resets = np.asarray([sampler.resets_state(s) for s in window])
        state, carry, metrics = run_fn(state, starts, carry, resets)
        metrics = jax.device_get(metrics)
        losses += list(np.asarray(metrics["loss_sum"]) / np.asarray(metrics["tokens"]))
    return state, carry, [float(v) for v in losses]


def flat(tree) -> list[float]:
    """All values of a tree of global arrays; a carry spread over processes is gathered."""
    def host(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return np.asarray(leaf)
    return [float(v) for leaf in jax.tree.leaves(tree)
            for v in np.ravel(np.asarray(host(leaf), np.float64))]


def checkpoint_targets():
    """Arrays on this process's default device, as the training loop builds its fresh state:
    Orbax restores into their placement, whatever placement wrote the checkpoint."""
    return jax.device_put({"train": fresh_state(), "carry": init_carry(MODEL, BATCH)})


def save(directory: str, state, carry) -> None:
    store = RunCheckpoints(directory, max_to_keep=1)
    store.save(int(jax.device_get(state.step)), {"train": state, "carry": carry}, {}, wait=True)
    store.close()


def restore(directory: str):
    store = RunCheckpoints(directory, max_to_keep=1)
    restored, _ = store.restore(store.latest_complete_step(), checkpoint_targets())
    store.close()
    return restored["train"], restored["carry"]


def resume(dp: DataParallel, run_fn, directory: str):
    """Restores a logical checkpoint onto dp's devices and trains to NUM_TRAIN_STEPS."""
    state, carry = dp.from_logical(*restore(directory))
    sampler = make_sampler("sequential", TRAIN_IDS, BATCH, NUM_STEPS, 0,
                                   rows=dp.rows(BATCH))
    state, carry, losses = train(run_fn, sampler, state, carry, CHECKPOINT_STEP,
                                 NUM_TRAIN_STEPS)
    state, carry = dp.logical(state, carry)
    return {"losses": losses, "params": flat(state.params), "carry": flat(carry)}


def run_on(dp: DataParallel, run_fn, sampler_kind: str, checkpoint_dir: str | None = None):
    """NUM_TRAIN_STEPS steps from the fresh state on dp's devices; logical results."""
    sampler = make_sampler(sampler_kind, TRAIN_IDS, BATCH, NUM_STEPS, 0,
                                   rows=dp.rows(BATCH))
    state, carry = dp.from_logical(fresh_state(), init_carry(MODEL, BATCH))
    state, carry, losses = train(run_fn, sampler, state, carry, 0, CHECKPOINT_STEP)
    if checkpoint_dir:
        save(checkpoint_dir, *dp.logical(state, carry))
    state, carry, more = train(run_fn, sampler, state, carry, CHECKPOINT_STEP,
                               NUM_TRAIN_STEPS)
    state, carry = dp.logical(state, carry)
    return state, {"losses": losses + more, "params": flat(state.params), "carry": flat(carry)}



def evaluate_on(dp: DataParallel, params) -> dict:
    model, _ = model_and_optimizer()
    eval_fn = dp.compile_eval(functools.partial(eval_step, apply_fn=model.apply))
    start, stop = dp.rows(EVAL_BATCH, "eval_batch_size")
    return evaluate_ids(eval_fn, MODEL, dp.replicate(params), EVAL_IDS, batch_size=EVAL_BATCH,
                        num_steps=NUM_STEPS, rows=(start, stop),
                        carry=dp.shard_rows(init_carry(MODEL, stop - start)))


def evaluate_per_window(dp: DataParallel, params) -> dict:
    """The same evaluation as evaluate_on, as it ran before it moved onto the devices: one
    compiled step per window cut on the host (tests/training/eval_reference.py)."""
    model, _ = model_and_optimizer()
    start, stop = dp.rows(EVAL_BATCH, "eval_batch_size")
    loss_sum, tokens = eval_reference.reference_sums(
        eval_reference.data_parallel_step(dp, model.apply), dp.replicate(params), EVAL_IDS,
        batch_size=EVAL_BATCH, num_steps=NUM_STEPS, rows=(start, stop),
        carry=dp.shard_rows(init_carry(MODEL, stop - start)))
    return {**summarize(float(loss_sum), float(tokens)), "tokens": float(tokens)}


def sample(params) -> list[int]:
    return [int(t) for t in generate(MODEL, params, np.asarray([1, 2, 3]), 12)]


def usage_error(fn) -> str:
    try:
        fn()
    except UsageError as err:
        return str(err)
    return ""


def devices_main(out: str, checkpoint_dir: str) -> None:
    """Everything that needs several devices in one process; see the module docstring."""
    load_fresh_state(checkpoint_dir)
    result = {"num_devices": jax.device_count(), "reference": {}, "parallel": {}}
    reference_fn = reference_train_fn()
    single = DataParallel("shard_map", devices=jax.devices()[:1])
    reference_state = None
    for kind in SAMPLERS:
        reference_state, result["reference"][kind] = run_on(single, reference_fn, kind)
    params = reference_state.params  # sequential run; used for evaluation and generation
    result["reference"]["evaluation"] = evaluate_on(single, params)
    result["reference"]["evaluation_per_window"] = evaluate_per_window(single, params)
    result["reference"]["sample"] = sample(params)
    for mode in MODES:
        dp = DataParallel(mode)
        run_fn = compile_train(dp)
        out_mode = result["parallel"][mode] = {}
        for kind in SAMPLERS:
            ckpt = f"{checkpoint_dir}/from_{mode}" if kind == "sequential" else None
            out_mode[kind] = run_on(dp, run_fn, kind, ckpt)[1]
        out_mode["evaluation"] = evaluate_on(dp, params)
        out_mode["evaluation_per_window"] = evaluate_per_window(dp, params)
        # Generation from logical parameters laid out for N devices.
        out_mode["sample"] = sample(dp.logical(dp.replicate(reference_state), ())[0].params)
        out_mode["resumed_from_1"] = resume(dp, run_fn, f"{checkpoint_dir}/from_1")
        out_mode["batch_error"] = usage_error(functools.partial(dp.rows, BATCH + 4))
        out_mode["eval_batch_error"] = usage_error(
            functools.partial(dp.rows, 4, "eval_batch_size"))
    # The training program, stopped at a checkpoint that the test process resumes (skipped
    # without a corpus: a machine without the training program's writers can check the rest).
    if os.path.exists(f"{checkpoint_dir}/corpus.txt"):
        result["trainer"] = run_trainer(trainer_argv(
            f"{checkpoint_dir}/corpus.txt", f"{checkpoint_dir}/trainer_on_8",
            CHECKPOINT_STEP))["final"]
    with open(out, "w") as f:
        json.dump(result, f)


def trainer_argv(text: str, workdir: str, num_train_steps: int, *extra: str) -> list[str]:
    """A tiny run of the training program; 8 rows so that 1 and 8 devices both divide it."""
    return [f"--corpus=file:{text}", "--batch_size=8", "--eval_batch_size=8", "--num_steps=8",
            "--num_hiddens=16", "--num_layers=2", "--lr=0.5", "--log_every=5",
            "--eval_every=10", "--checkpoint_every=10", "--sample_length=8",
            f"--num_train_steps={num_train_steps}", f"--workdir={workdir}", *extra]


def run_trainer(argv: list[str]) -> dict:
    from deeprnn.config import parse_args
    from deeprnn.training.loop import train_and_evaluate

    return train_and_evaluate(*parse_args(argv))


def multihost_main(out: str, checkpoint_dir: str, address: str, num_processes: int,
                   process_id: int) -> None:
    start_multihost(True, address, num_processes, process_id)
    load_fresh_state(checkpoint_dir)
    result = {"process_index": jax.process_index(), "num_devices": jax.device_count(),
              "local_devices": jax.local_device_count()}
    for mode in MODES:
        dp = DataParallel(mode)
        run_fn = compile_train(dp)
        result[mode] = {"rows": dp.rows(BATCH)}
        for kind in SAMPLERS:
            # Every process takes part in the Orbax save of the global arrays.
            ckpt = (f"{checkpoint_dir}/from_processes"
                    if (mode, kind) == ("shard_map", "sequential") else None)
            state, result[mode][kind] = run_on(dp, run_fn, kind, ckpt)
        result[mode]["evaluation"] = evaluate_on(dp, state.params)
        result[mode]["evaluation_per_window"] = evaluate_per_window(dp, state.params)
        # Generation on process 0 alone, as the training loop's console lines do.
        if jax.process_index() == 0:
            result[mode]["sample"] = sample(dp.on_one_device(state.params))
        # Every process restores the checkpoint they wrote together, as a resumed run does.
        result[mode]["resumed"] = resume(dp, run_fn, f"{checkpoint_dir}/from_processes")
    with open(out, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        devices_main(sys.argv[2], sys.argv[3])
    else:
        multihost_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
