"""Recurrent cells written from their equations, as Flax modules that `nn.scan` runs over time.

A cell splits one layer's work in two, because only half of it is recurrent:

    project_inputs(inputs)  X_t W_x + b for every time step at once: one big matmul per layer
                            (a row gather for layer 0, whose input is one-hot), hoisted out of
                            the time loop because it does not depend on the previous state;
    __call__(carry, xw_t)   the recurrent half of one time step; `time_scanned(cell)` lifts it
                            with `nn.scan`, which broadcasts the parameters over time.

Parameters, the layout that `fused` and checkpoints share (gate blocks side by side, H wide):

    W_x [in, G*H]   W_h [H, G*H]   b [G*H]   (+ b_hn [H], gru cudnn variant only)
    rnn G=1; gru G=3, gates (r, z, n); lstm G=4, gates (i, f, g, o)

Matmuls run in the compute dtype (float32 or bfloat16) with float32 accumulation; parameters are
stored in float32 and cast inside the compute, and the gate arithmetic and the carried state stay
float32 so that a state carried across many batches does not drift by bfloat16 rounding.

Initialisation (the same for every cell and depth; SGD with clipping at 1 trains 8-layer stacks
at lr 2 for gru/lstm and lr 1, the book's rate, for the plain rnn: tests/model/test_models.py):
  * W_h: an orthogonal [H, H] block per gate: all singular values equal, so no direction of the
    state grows or dies faster than another over 35 steps, forward or in the gradient.
  * W_x: normal with variance 1/in (LeCun), so above layer 0, where the input is an H-vector of
    activations, the pre-activation keeps the input's scale however deep the stack is (d2l's
    N(0, 0.01) shrinks the signal about 10x a layer: an 8-layer stack starts out dead).
  * Both scaled by 1/sqrt(2): the input and the recurrent term add up, so each gets half of the
    pre-activation's variance. The recurrence then starts at spectral radius 0.71 rather than 1,
    which leaves room for a clipped SGD step of norm 2: at radius 1 such a step pushed 8-layer
    plain RNNs (relu above all) into explosion (loss 3 -> 300) in our trials.
  * b zero, except the LSTM forget gate at 1 (Jozefowicz et al., 2015): the cell starts out
    remembering, which is what lets deep LSTMs start learning long dependencies; b_hn zero.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
INIT_GAIN = 2 ** -0.5  # input and recurrent terms each carry half the variance (see above)
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def blockwise_orthogonal(num_gates: int):
    """Initialiser for W_h [H, G*H]: one orthogonal [H, H] block per gate, times INIT_GAIN."""

    def init(rng, shape, dtype=jnp.float32):
        hidden = shape[0]
        keys = jax.random.split(rng, num_gates)
        orthogonal = nn.initializers.orthogonal(scale=INIT_GAIN)
        blocks = [orthogonal(k, (hidden, hidden), dtype) for k in keys]
        return jnp.concatenate(blocks, axis=-1)

    return init


def bias_with_block(block: int, num_gates: int, value: float):
    """Initialiser for b [G*H]: zero, except gate `block` set to `value` (the forget gate)."""

    def init(rng, shape, dtype=jnp.float32):
        del rng
        hidden = shape[0] // num_gates
        return jnp.zeros(shape, dtype).at[block * hidden:(block + 1) * hidden].set(value)

    return init


def matmul(x: jax.Array, w: jax.Array, compute_dtype: Any) -> jax.Array:
    """x @ w in the compute dtype, accumulated and returned in float32."""
    return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype),
                   preferred_element_type=jnp.float32)


class RecurrentCell(nn.Module):
    """Shared parts: the parameters, the hoisted input projection, the zero state."""

    in_features: int  # vocab size for layer 0 (inputs are token ids), H above
    hidden: int
    token_inputs: bool = False  # layer 0: inputs are token ids, W_x rows are gathered
    compute_dtype: Any = jnp.float32

    num_gates: ClassVar[int] = 1

    def bias_init(self):
        return nn.initializers.zeros_init()

    def setup(self):
        gh = self.num_gates * self.hidden
        input_init = nn.initializers.variance_scaling(INIT_GAIN**2, "fan_in", "truncated_normal")
        self.W_x = self.param("W_x", input_init, (self.in_features, gh))
        self.W_h = self.param("W_h", blockwise_orthogonal(self.num_gates), (self.hidden, gh))
        self.b = self.param("b", self.bias_init(), (gh,))

    def project_inputs(self, inputs: jax.Array) -> jax.Array:
        """X W_x + b for all time steps: ids [..] -> [.., G*H], or [.., in] -> [.., G*H]."""
        if self.token_inputs:
            # One-hot X times W_x is a row lookup; the cast rounds the rows as a bfloat16
            # matmul would, so both input paths compute the same thing.
            rows = self.W_x[inputs].astype(self.compute_dtype).astype(jnp.float32)
        else:
            rows = matmul(inputs, self.W_x, self.compute_dtype)
        return rows + self.b


class RNNCell(RecurrentCell):
    """H_t = phi(X_t W_x + H_{t-1} W_h + b), phi = tanh or relu."""

    activation: str = "tanh"

    def __call__(self, h, xw_t):
        h = ACTIVATIONS[self.activation](xw_t + matmul(h, self.W_h, self.compute_dtype))
        return h, h


class GRUCell(RecurrentCell):
    """Gated recurrent unit, gates (r, z, n); two variants of the candidate state n.

        R = sigmoid(X W_xr + H W_hr + b_r)        Z = sigmoid(X W_xz + H W_hz + b_z)
        d2l:   N = tanh(X W_xn + (R * H) W_hn + b_n)            (the book's equation)
        cudnn: N = tanh(X W_xn + b_n + R * (H W_hn + b_hn))     (Flax GRUCell, PyTorch, cuDNN)
        H' = Z * H + (1 - Z) * N
    cudnn lets all three hidden matmuls run as one; d2l needs R before the candidate's matmul.
    """

    variant: str = "cudnn"

    num_gates: ClassVar[int] = 3

    def setup(self):
        super().setup()
        if self.variant == "cudnn":
            self.b_hn = self.param("b_hn", nn.initializers.zeros_init(), (self.hidden,))

    def __call__(self, h, xw_t):
        hid, cd = self.hidden, self.compute_dtype
        if self.variant == "cudnn":
            hw = matmul(h, self.W_h, cd)
            r = jax.nn.sigmoid(xw_t[:, :hid] + hw[:, :hid])
            z = jax.nn.sigmoid(xw_t[:, hid:2 * hid] + hw[:, hid:2 * hid])
            n = jnp.tanh(xw_t[:, 2 * hid:] + r * (hw[:, 2 * hid:] + self.b_hn))
        else:
            rz = jax.nn.sigmoid(xw_t[:, :2 * hid] + matmul(h, self.W_h[:, :2 * hid], cd))
            r, z = rz[:, :hid], rz[:, hid:]
            n = jnp.tanh(xw_t[:, 2 * hid:] + matmul(r * h, self.W_h[:, 2 * hid:], cd))
        h = z * h + (1.0 - z) * n
        return h, h


class LSTMCell(RecurrentCell):
    """Long short-term memory, gates (i, f, g, o); carry (C, H).

        [I, F, G, O] = X W_x + H W_h + b   (one matmul for all four gates)
        C' = sigmoid(F) * C + sigmoid(I) * tanh(G)     H' = sigmoid(O) * tanh(C')
    """

    num_gates: ClassVar[int] = 4

    def bias_init(self):
        return bias_with_block(1, self.num_gates, 1.0)  # forget gate starts open

    def __call__(self, carry, xw_t):
        c, h = carry
        gates = xw_t + matmul(h, self.W_h, self.compute_dtype)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h


def zero_carry(cell: str, batch_size: int, hidden: int):
    """The initial state of one layer: (C, H) for lstm, H otherwise; float32 zeros [B, H]."""
    zeros = jnp.zeros((batch_size, hidden), jnp.float32)
    return (zeros, zeros) if cell == "lstm" else zeros


def time_scanned(cell_class: type[RecurrentCell]):
    """The cell lifted over a time-major sequence: (carry, xw [T, B, G*H]) -> (carry, [T, B, H]).

    Parameters are broadcast (the same at every step), so they stay where the unlifted cell puts
    them, and `project_inputs` (not lifted) creates W_x and b in that same scope.
    """
    return nn.scan(cell_class, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=0, out_axes=0)


def make_cell(cell: str, *, in_features: int, hidden: int, token_inputs: bool,
              compute_dtype: Any, activation: str = "tanh", gru_variant: str = "cudnn",
              name: str | None = None) -> RecurrentCell:
    """The time-scanned cell `cell` ("rnn" | "gru" | "lstm") with its hyper-parameters."""
    common = dict(in_features=in_features, hidden=hidden, token_inputs=token_inputs,
                  compute_dtype=compute_dtype, name=name)
    if cell == "rnn":
        return time_scanned(RNNCell)(activation=activation, **common)
    if cell == "gru":
        return time_scanned(GRUCell)(variant=gru_variant, **common)
    return time_scanned(LSTMCell)(**common)
