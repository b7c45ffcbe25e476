"""One LSTM layer over all time steps, with its backward pass written out by hand.

The fused model's layerwise schedule runs this for LSTM stacks (the book's deep-RNN recipe and
every benchmark config). The general recurrence in fused.py serves every cell through
`jax.vjp` of the cell inside its backward scan; for the LSTM the derivative is short enough to
write down, and writing it lets the step do less:

- the forward keeps the gate activations a = (i, f, g, o) and the cell state c of every step, so
  the backward evaluates no sigmoid and one tanh (of c), where jax.vjp re-runs the cell (five
  transcendentals) and then differentiates it;
- what of the derivative does not depend on the gradients carried from step to step is formed
  for all steps at once before the backward scan, whose step keeps only the chain (`bwd`);
- the gate-gradient of every step, dz, is both the gradient of the layer's input projection and
  the operand of the weight gradient: one [T, B, 4H] buffer, where the general path writes two
  identical ones (the input part and the recurrent part of the pre-activation); it is kept in
  the compute dtype, the form every product that reads it takes (see `bwd`);
- the gate activations and the gate gradient dz are computed over whole [B, 4H] rows (see
  `lstm_gates`);
- the weight gradient is one matmul over all steps after the scan, and the per-step matmul of the
  backward reads W_h transposed once before the loop.

Equality with the scratch model's LSTM (outputs and gradients) is tested in
tests/model/test_fused.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deeprnn.model.config import compute_dtype as dtype_of


def mm(spec: str, a, b, dtype):
    """einsum in the compute dtype with float32 accumulation and result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                      preferred_element_type=jnp.float32)


def _gate_constants(hidden: int, dtype):
    """Per-column constants over the [i, f, g, o] blocks: scale and shift of `lstm_gates`;
    u and v of its derivative, u + a * (v - a) (a - a^2 for a sigmoid, 1 - a^2 for tanh)."""
    half, one, zero = (jnp.full((hidden,), value, dtype) for value in (0.5, 1.0, 0.0))
    scale = jnp.concatenate([half, half, one, half])
    shift = jnp.concatenate([half, half, zero, half])
    u = jnp.concatenate([zero, zero, one, zero])
    v = jnp.concatenate([one, one, zero, one])
    return scale, shift, u, v


def lstm_gates(z):
    """sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of the pre-activations z [..., 4H], as one
    tanh over the whole row: sigmoid(x) = (tanh(x / 2) + 1) / 2.

    XLA:CPU vectorises a transcendental over a whole row but not over a column slice of it:
    35 d2l-shape LSTM cell steps took 3.9 ms with four sliced activations, 0.9 ms like this.
    """
    scale, shift, _, _ = _gate_constants(z.shape[-1] // 4, z.dtype)
    return jnp.tanh(z * scale) * scale + shift


def _cell(a, c):
    i, f, g, o = jnp.split(a, 4, axis=-1)
    c = f * c + i * g
    return c, o * jnp.tanh(c)


@functools.cache
def make_projection(compute_dtype: str):
    """project(x [T,B,In], w [In,G]) -> x w [T,B,G], the input projection of a layer above the
    first (its bias is added by the consumer), with its backward written out: the input
    gradient and the weight gradient are products in the compute dtype with float32
    accumulation, as in the forward. JAX's own transpose of a bfloat16 product takes the float32
    cotangent and so runs both in float32 (d2l shape, 2-core CPU: 2.7 ms of the bfloat16 step
    for the input gradient alone)."""
    dtype = dtype_of(compute_dtype)

    @jax.custom_vjp
    def project(x, w):
        return mm("tbh,hg->tbg", x, w, dtype)

    def fwd(x, w):
        return project(x, w), (x, w)

    def bwd(saved, dz):
        x, w = saved
        return mm("tbg,hg->tbh", dz, w, dtype), mm("tbh,tbg->hg", x, dz, dtype)

    project.defvjp(fwd, bwd)
    return project


@functools.cache
def make_lstm_layer(compute_dtype: str, unroll: int):
    """lstm_layer(xs [T,B,4H], w_h [H,4H], b [4H], c0 [B,H], h0 [B,H]) -> (ys [T,B,H], (c_T, h_T)).

    xs is the input projection of every step, without the bias: the step adds b inside its own
    elementwise work, where a separate xs + b would be one more pass over a [T, B, 4H] buffer
    (d2l shape, bfloat16, 2-core CPU: 0.22 ms of the step for layer 1's). The recurrent matmul
    runs in compute_dtype ("float32" or "bfloat16") with float32 accumulation, the cell in
    float32.
    """
    dtype = dtype_of(compute_dtype)
    # In a narrower compute dtype the training forward does not stack h: the step forms h only
    # as the next matmul's bfloat16 operand, and ys = o tanh(c) is one pass over the stacked
    # gates and cell states after the scan. Stacking it made XLA keep a float32 h and a
    # separate tanh(c) fusion in every step (d2l shape, 2-core CPU, same-run A/B, 1 Dec 2026:
    # 0.95-0.98x the bfloat16 step time over three runs; in float32, where h is the matmul
    # operand itself, the pass after the scan cost 1.02-1.03x, so float32 stacks h).
    ys_after_scan = dtype != jnp.float32

    def forward(xs, w_h, b, c0, h0, keep_residuals):
        def step(carry, x):
            c, h = carry
            # h_{t-1} as the matmul reads it: the backward's weight gradient takes these as
            # they are, where forming [h0, ys[:-1]] there fused a concatenate, the carry
            # reset's select and a cast into the transposing copy the product needs (d2l
            # shape, bfloat16: 0.4 ms a layer; same-run A/B of the step: 0.93-0.95x).
            h_in = h.astype(dtype)
            a = lstm_gates(x + b + mm("bh,hg->bg", h_in, w_h, dtype))
            c, h = _cell(a, c)
            if not keep_residuals:
                return (c, h), h
            return (c, h), (a, c, h_in) if ys_after_scan else (a, c, h_in, h)

        (c_last, h_last), outputs = jax.lax.scan(step, (c0, h0), xs, unroll=unroll)
        if not keep_residuals:
            return outputs, (c_last, h_last), None
        if ys_after_scan:
            gates, cs, _ = outputs
            ys = gates[..., 3 * cs.shape[-1]:] * jnp.tanh(cs)
        else:
            *outputs, ys = outputs
        return ys, (c_last, h_last), tuple(outputs)

    @jax.custom_vjp
    def lstm_layer(xs, w_h, b, c0, h0):
        ys, final, _ = forward(xs, w_h, b, c0, h0, False)
        return ys, final

    def fwd(xs, w_h, b, c0, h0):
        ys, final, (gates, cs, h_prev) = forward(xs, w_h, b, c0, h0, True)
        return (ys, final), (w_h, c0, h_prev, gates, cs)

    def bwd(saved, cotangents):
        w_h, c0, h_prev, gates, cs = saved
        dys, (dc_last, dh_last) = cotangents
        _, _, u, v = _gate_constants(w_h.shape[0], jnp.float32)
        c_prev = jnp.concatenate([c0[None], cs[:-1]])
        # Every factor that does not depend on the carried gradients, for all steps at once
        # (large fusions XLA vectorises well), so that the scan's step is only the chain:
        #   dc_t = dc_{t+1} f_{t+1} + dh_t p_t,  p = o (1 - tanh(c)^2)
        #   dz_t = [dc_t, dc_t, dc_t, dh_t] * m_t,  m = [g, c_prev, i, tanh(c)] * a'(z)
        # where a'(z) = u + a (v - a) is each gate's derivative. Against the same products
        # formed inside the step (d2l shape, 2-core CPU, same-run A/B, 30 Nov 2026): 0.93 ±
        # 0.02x the step time in float32 (4 runs), 0.92 ± 0.02x in bfloat16 (5 runs).
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        tanh_c = jnp.tanh(cs)
        p = o * (1.0 - tanh_c * tanh_c)
        m = jnp.concatenate([g, c_prev, i, tanh_c], axis=-1) * (u + gates * (v - gates))
        # XLA:CPU would fold a transpose into every step's dot, and the transposed-operand dot
        # is slower (d2l shape: 206 -> 160 us a step); the barrier keeps one transposed copy.
        w_h_t = jax.lax.optimization_barrier(w_h.T)

        def back_step(carry, inputs):
            dc, dh = carry
            m_t, p_t, f_t, dy = inputs
            dh = dh + dy
            dc = dc + dh * p_t
            # dz in the compute dtype: the recurrent, weight and input-gradient products round
            # it to that anyway; the bias gradient and layer 0's W_x rows (the scratch model
            # rounds those rows' gradient to bfloat16 too) sum it in float32. Stacking the
            # float32 dz and casting it after the scan wrote and read twice the bytes (d2l
            # shape, 2-core CPU, same-run A/B, 1 Dec 2026: 0.92-0.93x the bfloat16 step time,
            # two runs; gradient error against the float32 model unchanged at 2.7e-3-4.6e-3).
            dz = (jnp.concatenate([dc, dc, dc, dh], axis=-1) * m_t).astype(dtype)
            return (dc * f_t, mm("bg,gh->bh", dz, w_h_t, dtype)), dz

        (dc0, dh0), dzs = jax.lax.scan(back_step, (dc_last, dh_last), (m, p, f, dys),
                                       reverse=True, unroll=unroll)
        dw_h = mm("tbh,tbg->hg", h_prev, dzs, dtype)
        db = dzs.sum((0, 1), dtype=jnp.float32)
        return dzs.astype(jnp.float32), dw_h, db, dc0, dh0

    lstm_layer.defvjp(fwd, bwd)
    return lstm_layer
