"""Evaluation on the devices (windows cut there, K per call) equals the loop it replaced, one
compiled step per window cut on the host, exactly: on one device, under both data-parallel
modes on one device, and for stacked seeds. The 8-device comparison runs in
tests/training/parallel_worker.py (test_parallel.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.stack import init_carry
from deeprnn.training import evaluation, seeds
from deeprnn.training.evaluation import evaluate_ids, single_device_eval_fn
from deeprnn.training.parallel import DataParallel
from deeprnn.training.train_step import eval_step, summarize
from tests.training import eval_reference

MODEL = ModelConfig(vocab_size=11, num_hiddens=16, num_layers=2, cell="lstm")
# (tokens, streams, steps): one window; a call with padded windows past the end; a stream
# longer than its neighbours; more windows than one call holds (200 windows: 4 calls of 64).
SHAPES = [(40, 4, 35), (200, 8, 6), (901, 3, 7), (2000, 2, 5)]


def token_ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, MODEL.vocab_size, n).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.PRNGKey(3))


def _eval_step(model):
    return functools.partial(eval_step, apply_fn=model.apply)


def assert_equal_to_reference(result: dict, loss_sum: float, tokens: float, length: int,
                              streams: int):
    assert result["tokens"] == tokens == length - streams
    assert result["loss"] == summarize(float(loss_sum), float(tokens))["loss"]  # bit for bit


@pytest.mark.parametrize("length,batch_size,num_steps", SHAPES)
def test_one_device_equals_the_window_loop(model, params, length, batch_size, num_steps):
    ids = token_ids(length, length)
    got = evaluate_ids(single_device_eval_fn(MODEL), MODEL, params, ids, batch_size=batch_size,
                       num_steps=num_steps)
    sums = eval_reference.reference_sums(
        eval_reference.one_device_step(model.apply), params, ids, batch_size=batch_size,
        num_steps=num_steps, rows=(0, batch_size), carry=init_carry(MODEL, batch_size))
    assert_equal_to_reference(got, *sums, length, batch_size)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_data_parallel_on_one_device_equals_the_window_loop(model, params, mode):
    length, batch_size, num_steps = 901, 3, 7
    ids = token_ids(length, 1)
    dp = DataParallel(mode, devices=jax.devices()[:1])
    rows = dp.rows(batch_size)
    got = evaluate_ids(dp.compile_eval(_eval_step(model)), MODEL, dp.replicate(params), ids,
                       batch_size=batch_size, num_steps=num_steps, rows=rows,
                       carry=dp.shard_rows(init_carry(MODEL, batch_size)))
    sums = eval_reference.reference_sums(
        eval_reference.data_parallel_step(dp, model.apply), dp.replicate(params), ids,
        batch_size=batch_size, num_steps=num_steps, rows=rows,
        carry=dp.shard_rows(init_carry(MODEL, batch_size)))
    assert_equal_to_reference(got, *sums, length, batch_size)


def test_stacked_seeds_equal_the_window_loop_and_each_seed_alone(model):
    length, batch_size, num_steps = 200, 8, 6
    ids = token_ids(length, 2)
    stack = seeds.SeedStack(3)
    per_seed = [init_params(MODEL, jax.random.PRNGKey(s)) for s in range(3)]
    params = seeds.stack(per_seed)
    carry = stack.shard_rows(init_carry(MODEL, batch_size))
    got = evaluate_ids(stack.compile_eval(_eval_step(model)), MODEL, params, ids,
                       batch_size=batch_size, num_steps=num_steps, carry=carry)
    loss_sums, tokens = eval_reference.reference_sums(
        eval_reference.seeds_step(model.apply), params, ids, batch_size=batch_size,
        num_steps=num_steps, rows=(0, batch_size), carry=carry)
    assert len(got) == 3
    for k in range(3):
        assert_equal_to_reference(got[k], loss_sums[k], tokens[k], length, batch_size)
        alone = evaluate_ids(single_device_eval_fn(MODEL), MODEL, per_seed[k], ids,
                             batch_size=batch_size, num_steps=num_steps)
        assert got[k]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert len({d["loss"] for d in got}) == 3  # the seeds do differ


def test_the_host_sends_window_numbers_not_windows(model, params, monkeypatch):
    """The split is placed once; every call gets O(B x T) numbers, whatever the split's length,
    and the calls cover every window once, WINDOWS_PER_CALL at a time."""
    monkeypatch.setattr(evaluation, "WINDOWS_PER_CALL", 16)
    compiled = single_device_eval_fn(MODEL)
    placed, calls = [], []

    def put_ids(ids):
        placed.append(len(ids))
        return compiled.put_ids(ids)

    def run(params, ids, positions, ends, windows, carry, sums):
        calls.append((positions.shape, ends.shape, windows.tolist()))
        return compiled.run(params, ids, positions, ends, windows, carry, sums)

    length, batch_size, num_steps = 2000, 2, 5  # 999 targets a stream: 200 windows
    spy = dataclasses.replace(compiled, put_ids=put_ids, run=run)
    got = evaluate_ids(spy, MODEL, params, token_ids(length, 0), batch_size=batch_size,
                       num_steps=num_steps)
    assert placed == [2048]  # padded to a power of two, so similar splits share a program
    assert [c[:2] for c in calls] == [((2, 5), (2,))] * 13
    assert [w for c in calls for w in c[2]] == list(range(13 * 16))  # 200 used, 8 padded
    assert got["tokens"] == length - batch_size


def test_without_a_best_checkpoint_the_final_line_names_the_final_step(tmp_path):
    """--split=0.9,0,0.1 keeps no best: the test scores the final step's parameters, and the
    last console line used to call them the best-validation step's."""
    from types import SimpleNamespace

    from deeprnn.run.console import final_line

    splits = SimpleNamespace(validation=np.zeros(0, np.int32), test=token_ids(40, 0))
    logged = {}
    writer = SimpleNamespace(scalars=lambda step, values: logged.update(values))
    final, _ = evaluation.final_evaluation(
        str(tmp_path), lambda params, ids: [{"perplexity": 5.0, "bits_per_char": 2.32}],
        {"w": np.zeros(2, np.float32)}, splits, writer, 7)
    assert final["test/params"] == "final" and "test/params" not in logged
    cpu = SimpleNamespace(platform="cpu", id=0, device_kind="cpu")
    assert "test perplexity 5.00, 2.320 bits/char (final step 7)" in final_line(final, 6.0, 1.0,
                                                                                cpu)
