"""Each cell against a NumPy reference written gate by gate from its equations.

The references here (float64, batch-major, one time step at a time) are also what
tests/model/test_models.py stacks by hand.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprnn.model import cells
from tests.model.numpy_reference import (
    numpy_cell_step,
    numpy_layer,
    randomised,
    to_numpy_state,
)

CELLS = [("rnn", "tanh", "cudnn"), ("rnn", "relu", "cudnn"), ("gru", "tanh", "cudnn"),
         ("gru", "tanh", "d2l"), ("lstm", "tanh", "cudnn")]


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
