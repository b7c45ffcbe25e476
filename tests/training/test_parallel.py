"""Data parallelism: N devices and N processes train, evaluate and generate as one device does.

JAX fixes the device count when it starts, and this test process has one CPU device (other
tests rely on that). So the many-device side runs in subprocesses (tests/parallel_worker.py)
with XLA_FLAGS=--xla_force_host_platform_device_count: one process with 8 devices does every
comparison in one start-up and writes JSON; two processes with 2 devices each form one JAX
system over 127.0.0.1. This process runs the one-device side of the checkpoint round trips.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprnn.errors import UsageError
from deeprnn.training.parallel import DataParallel
from tests.helpers import REPO, free_port, run_together
from tests.training import parallel_worker as worker

pytestmark = pytest.mark.slow  # every test here runs whole programs or workers

WORKER = pathlib.Path(worker.__file__)
NUM_DEVICES = 8
TIMEOUT_S = 240


def worker_env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def assert_close(actual, desired, rtol=1e-5):
    """Relative to the values' scale, so that entries near zero do not dominate."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(desired))))


def resume_here(directory) -> dict:
    """Restores a checkpoint on this process's single device and trains it to the end."""
    dp = DataParallel()
    assert dp.num_devices == 1
    return worker.resume(dp, worker.compile_train(dp), str(directory))


def write_corpus(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    words = ["the", "time", "traveller", "machine", "smiled", "spoke", "of", "brass", "fire"]
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 900)) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The folder the workers share with this process: initial state and checkpoints."""
    directory = tmp_path_factory.mktemp("checkpoints")
    worker.save_fresh_state(str(directory))
    return directory


@pytest.fixture(scope="module")
def many_devices(checkpoints):
    """The 8-device worker's results; it resumes a checkpoint written here on one device."""
    dp = DataParallel()
    worker.run_on(dp, worker.compile_train(dp), "sequential",
                  str(checkpoints / "from_1"))
    write_corpus(checkpoints / "corpus.txt")
    out = checkpoints / "devices.json"
    proc = subprocess.run([sys.executable, str(WORKER), "devices", str(out), str(checkpoints)],
                          env=worker_env(NUM_DEVICES), capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_devices"] == NUM_DEVICES
    return result


@pytest.fixture(scope="module")
def two_processes(checkpoints):
    """Two processes with 2 devices each train together (jax.distributed over 127.0.0.1)."""
    address = f"127.0.0.1:{free_port()}"
    logs = [checkpoints / f"multihost_{i}.log" for i in range(2)]
    outs = [checkpoints / f"multihost_{i}.json" for i in range(2)]
    commands = [[sys.executable, str(WORKER), "multihost", str(outs[i]), str(checkpoints),
                 address, "2", str(i)] for i in range(2)]
    run_together(commands, [worker_env(2)] * 2, logs, TIMEOUT_S)
    return [json.loads(out.read_text()) for out in outs]


# -- in this process (one device) ------------------------------------------------------------
def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="--parallel='vmap' is not one of shard_map, pmap"):
        DataParallel("vmap")


@pytest.mark.parametrize("mode", worker.MODES)
def test_one_device_round_trip_keeps_values(mode):
    dp = DataParallel(mode)
    assert (dp.num_devices, dp.rows(5)) == (1, (0, 5))
    state = worker.fresh_state()
    carry = (jnp.arange(6.0).reshape(3, 2),) * 2  # one array twice, as init_carry's (c, h)
    placed_state, placed_carry = dp.from_logical(state, carry)
    # Own buffers, not aliases of each other or of the caller's arrays: the train step
    # donates the carry (XLA refuses one buffer twice) and `carry` is read below.
    donate = (jax.pmap if mode == "pmap" else jax.jit)(lambda c: c, donate_argnums=0)
    jax.block_until_ready(donate(dp.from_logical(state, carry)[1]))
    back_state, back_carry = dp.logical(placed_state, placed_carry)
    assert_close(worker.flat(back_state), worker.flat(state), rtol=0)
    assert_close(worker.flat(back_carry), worker.flat(carry), rtol=0)


# -- 8 devices in one process ----------------------------------------------------------------
@pytest.mark.parametrize("sampler", worker.SAMPLERS)
@pytest.mark.parametrize("mode", worker.MODES)
def test_eight_devices_train_like_one(many_devices, mode, sampler):
    reference = many_devices["reference"][sampler]
    parallel = many_devices["parallel"][mode][sampler]
    assert len(parallel["losses"]) == worker.NUM_TRAIN_STEPS
    assert_close(parallel["losses"], reference["losses"])
    assert_close(parallel["params"], reference["params"])
    assert_close(parallel["carry"], reference["carry"], rtol=1e-4)  # the carried state, too
    # The run did train: the parameters moved well beyond the tolerance.
    fresh = worker.flat(worker.fresh_state().params)
    assert np.max(np.abs(np.subtract(reference["params"], fresh))) > 1e-3


@pytest.mark.parametrize("mode", worker.MODES)
def test_eight_devices_evaluate_and_generate_like_one(many_devices, mode):
    reference, parallel = many_devices["reference"], many_devices["parallel"][mode]
    assert parallel["evaluation"]["tokens"] == reference["evaluation"]["tokens"] == (
        len(worker.EVAL_IDS) - worker.EVAL_BATCH)
    assert parallel["evaluation"]["loss"] == pytest.approx(reference["evaluation"]["loss"],
                                                           rel=1e-6)
    # Windows cut on the devices, K per call, give what a compiled step per host-cut window
    # gave, bit for bit, on 8 devices as on one.
    assert parallel["evaluation"] == parallel["evaluation_per_window"]
    assert reference["evaluation"] == reference["evaluation_per_window"]
    assert parallel["sample"] == reference["sample"]


@pytest.mark.parametrize("mode", worker.MODES)
def test_batch_size_must_divide_device_count(many_devices, mode):
    errors = many_devices["parallel"][mode]
    assert errors["batch_error"] == ("--batch_size=12 must divide by the 8 devices (it is the "
                                     "global batch, split evenly); use a multiple of 8")
    assert errors["eval_batch_error"].startswith("--eval_batch_size=4 must divide by the 8")


@pytest.mark.parametrize("mode", worker.MODES)
def test_checkpoint_from_one_device_resumes_on_eight(many_devices, mode):
    reference = many_devices["reference"]["sequential"]
    resumed = many_devices["parallel"][mode]["resumed_from_1"]
    assert_close(resumed["losses"], reference["losses"][worker.CHECKPOINT_STEP:])
    assert_close(resumed["params"], reference["params"])


@pytest.mark.parametrize("mode", worker.MODES)
def test_checkpoint_from_eight_devices_resumes_on_one(many_devices, checkpoints, mode):
    reference = many_devices["reference"]["sequential"]
    resumed = resume_here(checkpoints / f"from_{mode}")
    assert_close(resumed["losses"], reference["losses"][worker.CHECKPOINT_STEP:])
    assert_close(resumed["params"], reference["params"])
    assert_close(resumed["carry"], reference["carry"], rtol=1e-4)


# -- the training program (its 8-device side runs in the many_devices worker) ----------------
def test_training_program_resumes_an_eight_device_run_on_one(many_devices, checkpoints):
    """`train_and_evaluate` stopped at step 10 on 8 devices (shard_map) and finished here on
    one ends where an uninterrupted one-device run ends."""
    text = str(checkpoints / "corpus.txt")
    resumed = worker.run_trainer(worker.trainer_argv(
        text, str(checkpoints / "trainer_on_8"), worker.NUM_TRAIN_STEPS))["final"]
    straight = worker.run_trainer(worker.trainer_argv(
        text, str(checkpoints / "trainer_straight"), worker.NUM_TRAIN_STEPS))["final"]
    for key in ("validation/loss", "test/loss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5), key
    assert resumed["validation/tokens"] == straight["validation/tokens"]
    # The 8-device run's own step-10 evaluation is not the end point: the resume trained on.
    assert resumed["validation/loss"] < many_devices["trainer"]["validation/loss"] - 1e-3


# -- 2 processes x 2 devices -----------------------------------------------------------------
def test_two_processes_train_evaluate_and_generate_like_one(two_processes, many_devices):
    reference = many_devices["reference"]
    assert [r["process_index"] for r in two_processes] == [0, 1]
    for result in two_processes:
        assert (result["num_devices"], result["local_devices"]) == (4, 2)
        for mode in worker.MODES:
            # Each process built only its own rows of every global batch.
            assert result[mode]["rows"] == [4 * result["process_index"],
                                            4 * result["process_index"] + 4]
            for sampler in worker.SAMPLERS:
                assert_close(result[mode][sampler]["losses"], reference[sampler]["losses"])
                assert_close(result[mode][sampler]["params"], reference[sampler]["params"])
            assert result[mode]["evaluation"]["loss"] == pytest.approx(
                reference["evaluation"]["loss"], rel=1e-5)
            assert result[mode]["evaluation"] == result[mode]["evaluation_per_window"]
            if result["process_index"] == 0:
                assert result[mode]["sample"] == reference["sample"]
            resumed, sequential = result[mode]["resumed"], reference["sequential"]
            assert_close(resumed["losses"], sequential["losses"][worker.CHECKPOINT_STEP:])
            assert_close(resumed["params"], sequential["params"])


def test_checkpoint_from_two_processes_resumes_on_one(two_processes, many_devices,
                                                      checkpoints):
    reference = many_devices["reference"]["sequential"]
    resumed = resume_here(checkpoints / "from_processes")
    assert_close(resumed["losses"], reference["losses"][worker.CHECKPOINT_STEP:])
    assert_close(resumed["params"], reference["params"])
