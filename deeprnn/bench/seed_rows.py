"""The `seeds` config: K seeds of the fused model at the d2l shape, vmapped or run separately.

    fused x K seeds (vmap)      one compiled call steps K seeds at once, the program that
                                `--num_seeds=K` trains (deeprnn.training.seeds)
    fused x K seeds (separate)  K training states stepped in turn by the one-seed call, as K
                                separate runs would share the device

A row's ms/step is the time for one step of all K seeds, and its tokens/s the aggregate, K x B
x T tokens a step; `ratio_vs_one_seed` compares that with the 1-seed row of the same run. A
small model leaves an accelerator idle, so vmapped seeds should multiply the tokens/s (the
target on a GPU: 16 seeds >= 8x one); on a CPU whose cores the one seed already fills they
cannot. Seed 0 starts from the same parameters and sees the same batches as every other row, so
its loss after k steps equals theirs; seed k > 0 starts from PRNGKey(k) and reads the batches
rotated by k.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn.bench.rows import CLIP, LR, compile_call, device_name, model_config
from deeprnn.model.build import init_params
from deeprnn.model.fused import FusedDeepRNN
from deeprnn.model.stack import init_carry
from deeprnn.training import seeds
from deeprnn.training.device_batches import make_resident_multi_step
from deeprnn.training.optimizer import make_optimizer
from deeprnn.training.train_step import TrainState, train_steps

MODES = ("vmap", "separate")


def seed_row_names(shape) -> list[tuple[str, int, str]]:
    """(row name, K, mode) for a seeds config: 1 seed, then each K > 1 vmapped and separate."""
    rows = []
    for count in shape.seeds:
        for mode in (MODES if count > 1 else ("vmap",)):
            label = "1 seed" if count == 1 else f"{count} seeds ({mode})"
            rows.append((f"fused x {label}", count, mode))
    return rows


def prepare_seeds(count: int, mode: str, shape, base_params, stream, starts, args):
    """(facts, time_repeat) like rows.prepare_jax, for `count` seeds run as `mode`."""
    cfg = model_config(shape, "fused", args.dtype)
    model = FusedDeepRNN(cfg)
    tx = make_optimizer("sgd", LR, CLIP)
    spc = args.steps_per_call

    def fresh_state(k):
        params = base_params if k == 0 else init_params(cfg, jax.random.PRNGKey(k))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(k))

    def fresh_carry():
        return jax.tree.map(jnp.zeros_like, init_carry(cfg, shape.batch))

    def seed_starts(call_index, k):  # [spc, B]: seed k reads the batches rotated by k
        first = (call_index * spc + k) % len(starts)
        return np.take(starts, range(first, first + spc), axis=0, mode="wrap")

    ids, resets = jnp.asarray(stream), jnp.ones((spc,), bool)
    if mode == "vmap":
        state = seeds.stack([fresh_state(k) for k in range(count)])
        carry = seeds.stack([fresh_carry() for _ in range(count)])
        call = jax.jit(seeds.vmap_train_steps(
            lambda *a: train_steps(*a, apply_fn=model.apply, tx=tx), shape.steps),
            donate_argnums=(0, 3))

        def window_starts(call_index):  # [spc, K, B]
            return jnp.asarray(np.stack([seed_starts(call_index, k) for k in range(count)], 1))

        compiled, compile_s, mem = compile_call(call, (state, ids, window_starts(0), carry,
                                                       resets))
        states, carries = [state], [carry]
    else:
        call = make_resident_multi_step(model.apply, tx, shape.steps)
        states = [fresh_state(k) for k in range(count)]
        carries = [fresh_carry() for _ in range(count)]
        compiled, compile_s, mem = compile_call(
            call, (states[0], ids, jnp.asarray(seed_starts(0, 0)), carries[0], resets))
    calls, losses, seed_metrics = 0, None, [None] * count

    def run_calls(number):
        nonlocal calls, losses
        for _ in range(number):
            if mode == "vmap":
                states[0], carries[0], losses = compiled(states[0], ids, window_starts(calls),
                                                         carries[0], resets)
            else:
                for k in range(count):
                    states[k], carries[k], seed_metrics[k] = compiled(
                        states[k], ids, jnp.asarray(seed_starts(calls, k)), carries[k], resets)
            calls += 1
        jax.block_until_ready(states)

    run_calls(1)
    if mode == "separate":  # metrics [spc] per seed -> [spc, K], as the vmapped call's
        losses = jax.tree.map(lambda *m: jnp.stack(m, -1), *seed_metrics)
    # Each seed's loss at step k; seed 0's is the row's.
    per_seed = np.asarray(losses["loss_sum"][-1] / losses["tokens"][-1]).reshape(-1)
    loss_k = float(per_seed[0])

    def time_repeat() -> float:
        start = time.perf_counter()
        run_calls(args.steps // spc)
        return (time.perf_counter() - start) / args.steps

    time_repeat.compiled_hlo = compiled.as_text  # for --profile's table (describe_ops)

    facts = {"compile_s": compile_s, "peak_mem_bytes": mem, "loss_after_k": loss_k,
             "steps_per_call": spc, "device": device_name(), "seeds": count,
             "seed_mode": mode, "tokens_per_step": count * shape.batch * shape.steps,
             "loss_after_k_per_seed": [float(x) for x in per_seed]}
    return facts, time_repeat


def one_seed_ratios(rows: list[dict]) -> None:
    """ratio_vs_one_seed on every seeds row: its aggregate tokens/s over the 1-seed row's."""
    one = next((r for r in rows if r.get("seeds") == 1), None)
    for row in rows:
        row["ratio_vs_one_seed"] = (None if one is None else
                                    row["tokens_per_sec"] / one["tokens_per_sec"])
