"""Held-out evaluation: a whole split read exactly once, and the scores a run ends with.

Both the training loop (validation during training, the final validation and test scores) and
`python -m deeprnn.evaluate` (a trained run on any corpus, with the run's own vocabulary:
characters it never saw become <unk>, and the <unk> rate is reported) score through
`evaluate_ids`, which runs the windows on the devices (device_batches.eval_windows), a call per
WINDOWS_PER_CALL windows, with the split's ids placed there once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from deeprnn.config import RunConfig
from deeprnn.data.samplers import eval_streams
from deeprnn.model.build import build_model
from deeprnn.model.config import ModelConfig
from deeprnn.model.stack import init_carry
from deeprnn.run.checkpoints import restore_best
from deeprnn.training import device_batches
from deeprnn.training.progress import seed_record
from deeprnn.training.train_step import eval_step, summarize

# Windows per compiled call: enough that a call outlasts its dispatch on an accelerator (a
# window of a small model takes about a millisecond), few enough that one call stays short and
# the compiled program does not depend on the split's length. Shorter splits take the next
# power of two above their window count, so that splits of similar length share one program.
WINDOWS_PER_CALL = 64
# Splits up to this many tokens are padded (with zeros, never scored) to a power of two on the
# devices, for the same reason; longer ones are placed as they are, not copied.
PAD_UP_TO = 1 << 22


@functools.lru_cache(maxsize=16)
def single_device_eval_fn(model_config: ModelConfig) -> device_batches.CompiledEval:
    model = build_model(model_config)
    return device_batches.one_device_eval(functools.partial(eval_step, apply_fn=model.apply))


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _resident_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int32)
    if len(ids) > PAD_UP_TO:
        return ids
    return np.pad(ids, (0, _next_power_of_two(len(ids)) - len(ids)))


def evaluate_ids(eval_fn: device_batches.CompiledEval, model_config, params, ids: np.ndarray, *,
                 batch_size: int, num_steps: int, rows: tuple[int, int] | None = None,
                 carry=None) -> dict[str, float] | list[dict[str, float]]:
    """Loss, perplexity and bits per character over a whole split, read exactly once.

    The split runs as `batch_size` contiguous streams whose state carries from one window to
    the next, so every target token is scored with its full left context in its stream
    (samplers.eval_streams). `eval_fn` is a compiled evaluation (`compile_eval` of DataParallel
    or SeedStack, or single_device_eval_fn); `rows` this process's streams (multi-host); `carry`
    its initial state placed on the devices. Stacked seeds' params give a list, one dict a seed.
    The host holds O(batch_size x num_steps) numbers besides the split itself.
    """
    streams = eval_streams(len(ids), batch_size, num_steps)
    start, stop = rows or (0, batch_size)
    if carry is None:
        carry = init_carry(model_config, stop - start)
    device_ids = eval_fn.put_ids(_resident_ids(ids))
    positions = (streams.starts[start:stop, None] + np.arange(num_steps)).astype(np.int32)
    ends = (streams.starts + streams.targets)[start:stop].astype(np.int32)
    per_call = min(WINDOWS_PER_CALL, _next_power_of_two(streams.num_windows))
    sums = None
    for first in range(0, streams.num_windows, per_call):
        windows = np.arange(first, first + per_call, dtype=np.int32)
        carry, sums = eval_fn.run(params, device_ids, positions, ends, windows, carry, sums)
    loss_sum, tokens = (np.asarray(a, float)
                        for a in jax.device_get((sums["loss_sum"], sums["tokens"])))
    if loss_sum.ndim:  # one score per seed (--num_seeds)
        return [{**summarize(float(ls), float(t)), "tokens": float(t)}
                for ls, t in zip(loss_sum, tokens, strict=True)]
    return {**summarize(float(loss_sum), float(tokens)), "tokens": float(tokens)}


def evaluate_on_devices(devices, eval_fn, model_config: ModelConfig, params, ids: np.ndarray, *,
                        batch_size: int, num_steps: int):
    """`evaluate_ids` over every device of `devices` (DataParallel, or SeedStack for stacked
    seeds): this process scores its rows of the `batch_size` streams, and the sums are taken
    across all processes. `params` are logical; `eval_fn` is `devices.compile_eval(...)`."""
    start, stop = devices.rows(batch_size, "eval_batch_size")
    carry = devices.shard_rows(init_carry(model_config, stop - start))
    return evaluate_ids(eval_fn, model_config, devices.replicate(params), ids,
                        batch_size=batch_size, num_steps=num_steps, rows=(start, stop),
                        carry=carry)


def scoring_config(run_config: RunConfig, corpus: str | None, data_dir: str | None,
                   split: str) -> RunConfig:
    """The run's data flags for scoring `corpus` (None: its own). `all` is the whole text; the
    run's --max_tokens, a budget for its own training text, does not cut another corpus."""
    overrides = {"corpus": corpus or run_config.corpus,
                 "data_dir": data_dir or run_config.data_dir}
    if overrides["corpus"] != run_config.corpus:
        overrides["max_tokens"] = 0
    if split == "all":
        overrides.update(split="1,0,0", max_tokens=0)
    return dataclasses.replace(run_config, **overrides)


def final_evaluation(workdir: str, evaluate, params, splits, writer, step: int):
    """Validation on the last params, test on the best-validation params; means over seeds
    (with per-seed values for --num_seeds) and the per-seed finals. `evaluate(params, ids)`
    scores a split with one dict per seed."""
    final, per_seed = {}, None
    if splits.validation.size:
        validation = evaluate(params, splits.validation)
        per_seed = [{f"validation/{k}": v for k, v in d.items()} for d in validation]
        final.update(seed_record("validation", validation))
    if splits.test.size:
        params, best_step = restore_best(workdir, params)
        test = evaluate(params, splits.test)
        final.update(seed_record("test", test))
        per_seed = [{**(per_seed[k] if per_seed else {}),
                     **{f"test/{key}": v for key, v in d.items()}} for k, d in enumerate(test)]
        # Which parameters the test scored: the best-validation ones, or the final step's when
        # the run kept no best (no validation split, or no validation score was ever finite).
        final["test/checkpoint_step"] = best_step if best_step is not None else step
        final["test/params"] = "best-validation" if best_step is not None else "final"
    if final:
        writer.scalars(step, {k: v for k, v in final.items()
                              if k not in ("test/checkpoint_step", "test/params")})
    return final, per_seed
