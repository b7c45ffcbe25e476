"""NumPy references written from the cells' equations, one time step at a time: what the
cells, the stack and the fused implementation are checked against."""

import jax
import jax.numpy as jnp
import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gate_blocks(p, num_gates):
    """Per-gate (W_x, W_h, b) from the concatenated layout."""
    split = lambda a: np.split(np.asarray(a, np.float64), num_gates, axis=-1)
    return list(zip(split(p["W_x"]), split(p["W_h"]), split(p["b"]), strict=True))


def numpy_cell_step(cell, p, x, state, activation="tanh", gru_variant="cudnn"):
    """One time step: x [B, in] (one-hot for layer 0), state h or (c, h) -> (state, h)."""
    if cell == "rnn":
        ((w_x, w_h, b),) = gate_blocks(p, 1)
        phi = np.tanh if activation == "tanh" else (lambda a: np.maximum(a, 0.0))
        h = phi(x @ w_x + state @ w_h + b)
        return h, h
    if cell == "gru":
        (w_xr, w_hr, b_r), (w_xz, w_hz, b_z), (w_xn, w_hn, b_n) = gate_blocks(p, 3)
        h = state
        r = sigmoid(x @ w_xr + h @ w_hr + b_r)
        z = sigmoid(x @ w_xz + h @ w_hz + b_z)
        if gru_variant == "d2l":  # the book: reset before the hidden matmul
            n = np.tanh(x @ w_xn + (r * h) @ w_hn + b_n)
        else:  # cuDNN / PyTorch / Flax: reset scales the hidden matmul and its own bias
            n = np.tanh(x @ w_xn + b_n + r * (h @ w_hn + np.asarray(p["b_hn"], np.float64)))
        h = z * h + (1.0 - z) * n
        return h, h
    (w_xi, w_hi, b_i), (w_xf, w_hf, b_f), (w_xg, w_hg, b_g), (w_xo, w_ho, b_o) = gate_blocks(p, 4)
    c, h = state
    i = sigmoid(x @ w_xi + h @ w_hi + b_i)
    f = sigmoid(x @ w_xf + h @ w_hf + b_f)
    g = np.tanh(x @ w_xg + h @ w_hg + b_g)
    o = sigmoid(x @ w_xo + h @ w_ho + b_o)
    c = f * c + i * g
    h = o * np.tanh(c)
    return (c, h), h


def numpy_layer(cell, p, xs, state, **kwargs):
    """xs [B, T, in] -> (final state, outputs [B, T, H]), a Python loop over time."""
    outputs = []
    for t in range(xs.shape[1]):
        state, h = numpy_cell_step(cell, p, xs[:, t], state, **kwargs)
        outputs.append(h)
    return state, np.stack(outputs, axis=1)


def numpy_zero_state(cell, batch, hidden):
    zeros = np.zeros((batch, hidden))
    return (zeros, zeros) if cell == "lstm" else zeros


def randomised(params, seed, scale=0.5):
    """Every parameter (biases and b_hn included) random, so each one shows in the output."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, jnp.float32), params)


def to_numpy_state(state):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state)
