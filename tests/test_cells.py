"""Each cell against a NumPy reference written gate by gate from its equations.

The references here (float64, batch-major, one time step at a time) are also what
tests/test_models.py stacks by hand.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprnn import cells

CELLS = [("rnn", "tanh", "cudnn"), ("rnn", "relu", "cudnn"), ("gru", "tanh", "cudnn"),
         ("gru", "tanh", "d2l"), ("lstm", "tanh", "cudnn")]


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


class OneLayer(nn.Module):
    """A single time-scanned cell over a time-major sequence."""

    cell: str
    in_features: int
    hidden: int
    token_inputs: bool
    activation: str = "tanh"
    gru_variant: str = "cudnn"
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, inputs, carry):
        layer = cells.make_cell(self.cell, in_features=self.in_features, hidden=self.hidden,
                                token_inputs=self.token_inputs, activation=self.activation,
                                gru_variant=self.gru_variant, name="layer",
                                compute_dtype=jnp.dtype(self.compute_dtype))
        return layer(carry, layer.project_inputs(inputs))


def to_numpy_state(state):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state)


@pytest.mark.parametrize("token_inputs", [True, False], ids=["layer0-tokens", "dense-inputs"])
@pytest.mark.parametrize("cell,activation,gru_variant", CELLS)
def test_cell_matches_numpy_equations(cell, activation, gru_variant, token_inputs):
    batch, steps, in_features, hidden = 3, 5, 6, 4
    rng = np.random.default_rng(0)
    layer = OneLayer(cell, in_features, hidden, token_inputs, activation, gru_variant)
    if token_inputs:
        tokens = rng.integers(0, in_features, size=(batch, steps))
        inputs, xs = jnp.asarray(tokens.T, jnp.int32), np.eye(in_features)[tokens]
    else:
        xs = rng.normal(size=(batch, steps, in_features))
        inputs = jnp.asarray(xs.transpose(1, 0, 2), jnp.float32)
    # A non-zero initial state, so the recurrent path shows from the first step.
    state = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float32),
        cells.zero_carry(cell, batch, hidden))
    params = randomised(jax.jit(layer.init)(jax.random.key(0), inputs, state), seed=1)

    final, outputs = jax.jit(layer.apply)(params, inputs, state)
    want_final, want_outputs = numpy_layer(
        cell, params["params"]["layer"], xs, to_numpy_state(state), activation=activation,
        gru_variant=gru_variant)
    np.testing.assert_allclose(np.asarray(outputs).transpose(1, 0, 2), want_outputs,
                               rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                           to_numpy_state(final), want_final)


def test_gru_variants_differ():
    """The two GRU candidates are different functions (given a non-trivial reset gate)."""
    rng = np.random.default_rng(0)
    p = {"W_x": rng.normal(size=(3, 6)), "W_h": rng.normal(size=(2, 6)),
         "b": rng.normal(size=6), "b_hn": rng.normal(size=2)}
    x, h = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    d2l = numpy_cell_step("gru", p, x, h, gru_variant="d2l")[1]
    cudnn = numpy_cell_step("gru", p, x, h, gru_variant="cudnn")[1]
    assert np.abs(d2l - cudnn).max() > 1e-2


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_parameter_layout_and_initialisation(cell):
    in_features, hidden = 7, 16
    num_gates = cells.GATES[cell]
    layer = OneLayer(cell, in_features, hidden, token_inputs=True)
    state = cells.zero_carry(cell, 2, hidden)
    params = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((3, 2), jnp.int32), state)["params"]
    p = params["layer"]
    want = {"W_x": (in_features, num_gates * hidden), "W_h": (hidden, num_gates * hidden),
            "b": (num_gates * hidden,)}
    if cell == "gru":
        want["b_hn"] = (hidden,)
    assert {k: v.shape for k, v in p.items()} == want
    assert all(v.dtype == jnp.float32 for v in p.values())
    # orthogonal per gate, times 1/sqrt(2)
    for block in np.split(np.asarray(p["W_h"]), num_gates, axis=-1):
        np.testing.assert_allclose(block.T @ block, np.eye(hidden) / 2, atol=1e-5)
    forget = np.zeros(num_gates * hidden)
    if cell == "lstm":
        forget[hidden:2 * hidden] = 1.0
    np.testing.assert_array_equal(np.asarray(p["b"]), forget)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bfloat16_cell_close_to_float32_with_float32_state(cell):
    batch, steps, vocab, hidden = 2, 6, 5, 8
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (steps, batch)), jnp.int32)
    state = cells.zero_carry(cell, batch, hidden)
    f32 = OneLayer(cell, vocab, hidden, token_inputs=True)
    bf16 = OneLayer(cell, vocab, hidden, token_inputs=True, compute_dtype="bfloat16")
    params = jax.jit(f32.init)(jax.random.key(0), tokens, state)
    _, want = jax.jit(f32.apply)(params, tokens, state)
    final, outputs = jax.jit(bf16.apply)(params, tokens, state)
    assert outputs.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(final))
    np.testing.assert_allclose(outputs, want, atol=3e-2)
