"""A reference row for the benchmark: the matmuls of one training step, and nothing else.

Any implementation of the step has to run these products: every layer's recurrent matmul at
every time step, forward and backward (two chains of T dependent products per layer); the
input projections of layers above the first, their input gradients and every weight gradient
as large products over all steps; the output layer forward and backward. Here they run as
XLA compiles them on the device, with one cheap elementwise op per step to keep the chains
dependent, and no gates, no cell state, no loss, no optimizer. Their time is a floor for this
device's compiler and matmul library: the gap between it and a row is that row's elementwise
work, scan bookkeeping and memory traffic, and a peer faster than the floor cannot be matched
by scheduling alone. The row trains nothing, so it has no loss.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn.model.cells import GATES
from deeprnn.model.config import compute_dtype
from deeprnn.model.fused_lstm import mm as dtype_matmul


def prepare_floor(shape, dtype: str, steps: int, unroll: int, device: str):
    """(facts, time_repeat) like the other rows (rows.py); time_repeat runs `steps` floors."""
    width = GATES[shape.cell] * shape.hidden
    hidden, batch, num_steps = shape.hidden, shape.batch, shape.steps
    compute = compute_dtype(dtype)
    rng = np.random.default_rng(0)

    def weights(*dims):
        return jnp.asarray(rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[0]))

    params = {"w_h": [weights(hidden, width) for _ in range(shape.layers)],
              "w_x": [weights(hidden, width) for _ in range(shape.layers - 1)],
              "w_out": weights(hidden, shape.vocab)}
    x0 = weights(num_steps, batch, width)  # layer 0's gathered input rows

    def mm(spec, a, b):
        return dtype_matmul(spec, a, b, compute)

    def forward_chain(xs, w_h):
        def step(h, x):
            h = jnp.tanh(x[:, :hidden] + mm("bh,hg->bg", h, w_h)[:, :hidden])
            return h, h
        return jax.lax.scan(step, jnp.zeros((batch, hidden)), xs, unroll=unroll)[1]

    def backward_chain(dys, w_h_t):
        def step(dh, dy):
            dz = jnp.tile(dh + dy, (1, width // hidden))
            return mm("bg,gh->bh", dz, w_h_t), dz
        return jax.lax.scan(step, jnp.zeros((batch, hidden)), dys, reverse=True,
                            unroll=unroll)[1]

    def floor(params, x0):
        inputs, outputs, xs = [], [], x0
        for layer, w_h in enumerate(params["w_h"]):
            if layer:
                xs = mm("tbh,hg->tbg", outputs[-1], params["w_x"][layer - 1])
            inputs.append(outputs[-1] if layer else None)
            outputs.append(forward_chain(xs, w_h))
        logits = mm("tbh,hv->tbv", outputs[-1], params["w_out"])
        grads = [mm("tbh,tbv->hv", outputs[-1], logits)]
        dys = mm("tbv,hv->tbh", logits, params["w_out"])
        for layer in reversed(range(shape.layers)):
            dzs = backward_chain(dys, params["w_h"][layer].T)
            grads.append(mm("tbh,tbg->hg", outputs[layer], dzs))  # dW_h (h_prev's shape)
            if layer:
                grads.append(mm("tbh,tbg->hg", inputs[layer], dzs))  # dW_x
                dys = mm("tbg,hg->tbh", dzs, params["w_x"][layer - 1])
        return sum(g.sum() for g in grads)

    start = time.perf_counter()
    compiled = jax.jit(floor).lower(params, x0).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem = None if memory is None else int(memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes
                                         + memory.temp_size_in_bytes)
    jax.block_until_ready(compiled(params, x0))

    def time_repeat() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            result = compiled(params, x0)
        jax.block_until_ready(result)
        return (time.perf_counter() - start) / steps

    time_repeat.compiled_hlo = compiled.as_text  # for --profile's table (describe_ops)
    return {"compile_s": compile_s, "peak_mem_bytes": mem, "loss_after_k": None,
            "steps_per_call": 1, "device": device}, time_repeat
