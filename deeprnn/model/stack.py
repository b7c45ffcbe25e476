"""The deep (stacked) RNN language model, after d2l's "Deep Recurrent Neural Networks".

    H_t^(l) = cell_l(H_t^(l-1), H_{t-1}^(l)),   H_t^(0) = one-hot X_t,   O_t = H_t^(L) W_q + b_q

Layer l reads layer l-1's outputs at the same time step (d2l's JAX version feeds the raw input
to every layer; tests/model/test_models.py checks the wiring against a NumPy loop). Between two
recurrent layers, in this order: residual (layer output + layer input, layers l >= 1 where both
are H wide), layer norm `layer_norm_{l}` (after layer l), dropout; none after the last layer,
as PyTorch's nn.LSTM(dropout=...). All three are off by default, as in the book.

This module holds the stack every implementation shares (the output layer, the connections
between layers, the zero state) and two of the three implementations behind
`deeprnn.model.build.build_model(config)`, all with one __call__ signature:
    scratch  deeprnn.model.cells, written from the equations (the book's "from scratch")
    flax     Flax's SimpleCell / GRUCell / OptimizedLSTMCell under nn.scan (the book's
             "concise" version); Flax has no d2l-variant GRU
    fused    deeprnn.model.fused.FusedDeepRNN, the fast schedule; scratch parameter layout
deeprnn.model.convert maps parameters between scratch and flax.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprnn.errors import UsageError
from deeprnn.model import cells
from deeprnn.model.config import ModelConfig


class OutputLayer(nn.Module):
    """Dense layer H -> V, float32 logits whatever the compute dtype."""

    vocab_size: int
    compute_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (h.shape[-1], self.vocab_size))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.vocab_size,))
        return cells.matmul(h, kernel, self.compute_dtype) + bias


def between_layers(cfg, ys, inputs, index, train):
    """The connections after layer `index`: residual (layers >= 1), then, except after the
    last layer, layer norm and dropout. Call inside a compact method; every implementation
    calls this one, so submodule names (and so dropout masks) match across them."""
    if cfg.residual and index > 0:
        ys = ys + inputs
    if index < cfg.num_layers - 1:
        if cfg.layer_norm:
            ys = nn.LayerNorm(dtype=jnp.float32, name=f"layer_norm_{index}")(ys)
        ys = nn.Dropout(cfg.dropout, deterministic=not train)(ys)
    return ys


class DeepRNN(nn.Module):
    """The stack, the connections between layers and the output layer; subclasses give a layer.

    __call__(tokens int32 [B, T], carry=None, *, train=False) -> (logits f32 [B, T, V], carry)
    carry: tuple over layers, lstm (C, H), rnn/gru H, each float32 [B, H]; None means zeros.
    """

    config: ModelConfig

    def recurrent_layer(self, layer: int, inputs, carry):
        """(inputs: token ids [T, B] for layer 0, else [T, B, H]; carry) -> (carry, [T, B, H])."""
        raise TypeError(f"{type(self).__name__} must define recurrent_layer(layer, inputs, "
                        "carry); use ScratchDeepRNN, FlaxDeepRNN or FusedDeepRNN")

    @nn.compact
    def __call__(self, tokens, carry=None, *, train: bool = False):
        cfg = self.config
        if carry is None:
            carry = init_carry(cfg, tokens.shape[0])
        if len(carry) != cfg.num_layers:
            raise UsageError(f"carry has {len(carry)} layers, the model {cfg.num_layers}: "
                             "pass init_carry(config, batch_size)")
        x = tokens.T  # time-major: nn.scan runs over the leading axis without transposes
        new_carry = []
        for layer in range(cfg.num_layers):
            layer_carry, y = self.recurrent_layer(layer, x, carry[layer])
            new_carry.append(layer_carry)
            x = between_layers(cfg, y, x, layer, train)
        # The output layer is small (V columns), so transposing its result is the cheap place.
        logits = OutputLayer(cfg.vocab_size, cfg.dtype, name="output")(x)
        return logits.transpose(1, 0, 2), tuple(new_carry)


class ScratchDeepRNN(DeepRNN):
    """Layers from deeprnn.model.cells, each input projection hoisted out of its time scan."""

    def recurrent_layer(self, layer, inputs, carry):
        cfg = self.config
        cell = cells.make_cell(
            cfg.cell, in_features=cfg.vocab_size if layer == 0 else cfg.num_hiddens,
            hidden=cfg.num_hiddens, token_inputs=layer == 0, compute_dtype=cfg.dtype,
            activation=cfg.activation, gru_variant=cfg.gru_variant, name=f"layer_{layer}")
        return cell(carry, cell.project_inputs(inputs))


def _flax_step(cell, carry, x_t):
    """One step of a Flax cell; the carry is kept float32 (SimpleCell would make it bf16)."""
    carry, y = cell(carry, x_t)
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), carry), y.astype(jnp.float32)


class FlaxDeepRNN(DeepRNN):
    """Layers from Flax's own cells, fed one-hot inputs as in the book's concise version.

    Its parameters are Flax's (layer_{l}/{i,h} rnn, {ir,iz,in,hr,hz,hn} gru,
    {ii,if,ig,io,hi,hf,hg,ho} lstm, each {kernel[, bias]}); deeprnn.model.convert maps them.
    """

    def recurrent_layer(self, layer, inputs, carry):
        cfg = self.config
        common = dict(features=cfg.num_hiddens, dtype=cfg.dtype, name=f"layer_{layer}")
        if cfg.cell == "rnn":
            cell = nn.SimpleCell(activation_fn=cells.ACTIVATIONS[cfg.activation], **common)
        elif cfg.cell == "gru":
            cell = nn.GRUCell(**common)
        else:
            cell = nn.OptimizedLSTMCell(**common)
        if layer == 0:
            inputs = jax.nn.one_hot(inputs, cfg.vocab_size, dtype=cfg.dtype)
        scan = nn.scan(_flax_step, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=0, out_axes=0)
        return scan(cell, carry, inputs)


def init_carry(config: ModelConfig, batch_size: int):
    """Zero state: a tuple over layers of lstm (C, H) / rnn, gru H, float32 [batch_size, H]."""
    return tuple(cells.zero_carry(config.cell, batch_size, config.num_hiddens)
                 for _ in range(config.num_layers))
