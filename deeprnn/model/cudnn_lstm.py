"""LSTM stacks through cuDNN (`jax.experimental.rnn.lstm`), from the scratch parameters.

cuDNN takes one flat float32 vector per stack, in the layout that jax.experimental.rnn documents
(and reads back with `unpack_lstm_weights`): the weight matrices of every layer first, then the
biases of every layer,

    W_ih^0, W_hh^0, W_ih^1, W_hh^1, ..., b_ih^0, b_hh^0, b_ih^1, b_hh^1, ...

with W_ih [4H, in] and W_hh [4H, H] holding the gate blocks (i, f, g, o) stacked on the leading
axis: the scratch layout's W_x [in, 4H] and W_h [H, 4H] transposed, gates in the same order.
cuDNN keeps two biases per layer (CUDNN_RNN_DOUBLE_BIAS: x W_ih^T + b_ih + h W_hh^T + b_hh);
deeprnn keeps one. The scratch b goes to b_ih and b_hh is a constant zero, not a parameter, so
the gradient of b is cuDNN's gradient of b_ih, which is the gradient the scratch model computes
(both are the sum of the gate gradients), and clipping sees each bias once, as in PyTorch's peer
(deeprnn.bench.torch_peers). Reading a packed vector back (`from_cudnn`) adds the two biases.

The packing happens inside the forward pass from the parameters the model declares, so
checkpoints hold the one logical (scratch) layout whichever kernel trained them, and a run moves
between kernels and devices. The copy costs a pass over the weights per step (negligible).

What the binding takes, read from its source (jax 0.10.2, jax/experimental/rnn.py and
jaxlib/gpu_rnn.py; cuDNN side jaxlib/gpu/rnn_kernels.cc):
- float32 only: the lowering accepts float32/float64/complex outputs and raises ValueError for
  bfloat16; the cuDNN descriptor is built with CUDNN_DATA_FLOAT; a bfloat16 matmul precision
  raises NotImplementedError. So `--lstm_kernel=cudnn` refuses bfloat16 (deeprnn.config).
- TF32: allowed unless the matmul precision is "highest" (then CUDNN_FMA_MATH).
- CUDA (and ROCm) only: on a CPU or TPU there is no lowering, and tracing `lstm` already fails
  (AttributeError: jaxlib.gpu_rnn has no compute_rnn_workspace_reserve_space_sizes).
  `packed_lstm_reference` runs the same packed weights through `lstm_ref`, the binding's own
  reference, so the CPU tests check everything here but cuDNN itself.
- no vmap rule (rnn_fwd_p has none), so --num_seeds does not run it (deeprnn.config).
- every call copies seq_lengths to the host and synchronises the stream (rnn_kernels.cc), in
  the forward and the backward: a cost per call that only a GPU run can size.
- dropout in cuDNN uses its own masks; deeprnn's dropout goes between layers in JAX instead.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import rnn

from deeprnn.model import stack

PackedLSTM = Callable  # jax.experimental.rnn.lstm's signature


def to_cudnn(layers) -> jax.Array:
    """Scratch layer dicts [{W_x [in, 4H], W_h [H, 4H], b [4H]}, ...] -> cuDNN's flat vector."""
    matrices = [part for layer in layers for part in
                (layer["W_x"].T.reshape(-1), layer["W_h"].T.reshape(-1))]
    biases = [part for layer in layers for part in (layer["b"], jnp.zeros_like(layer["b"]))]
    return jnp.concatenate([jnp.asarray(p, jnp.float32) for p in matrices + biases])


def from_cudnn(weights, input_size: int, hidden: int, num_layers: int) -> list[dict]:
    """cuDNN's flat vector -> scratch layer dicts; the two biases of a layer add up into b."""
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(jnp.asarray(weights), input_size, hidden,
                                                     num_layers, False)
    return [{"W_x": w_ih[index].T, "W_h": w_hh[index].T, "b": b_ih[index] + b_hh[index]}
            for index in range(num_layers)]


def packed_lstm_reference(x, h_0, c_0, weights, seq_lengths, input_size, hidden_size,
                          num_layers, dropout, bidirectional, precision=None):
    """`jax.experimental.rnn.lstm` computed by its reference, `lstm_ref`, on the same packed
    weights (read with `unpack_lstm_weights`): runs anywhere, differentiable by JAX."""
    del precision  # lstm_ref's matmuls follow jax_default_matmul_precision
    unpacked = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers,
                                       bidirectional)
    return rnn.lstm_ref(x, h_0, c_0, *unpacked, seq_lengths, input_size, hidden_size,
                        num_layers, dropout, bidirectional)


def cudnn_layers(cfg, layers, tokens, states, train: bool, packed_lstm: PackedLSTM | None):
    """The recurrent layers through cuDNN. tokens int32 [B, T]; states per layer (c, h) [B, H].

    Returns (top-layer outputs, time_major, finals per layer (c, h)). Without connections
    between layers the whole stack is one cuDNN call, which lets cuDNN schedule the layers
    together, and the outputs come batch-major; with dropout, residual or layer norm each layer
    is its own call and the connections run time-major, as in every other implementation (so
    the dropout masks are the same).
    """
    lstm = packed_lstm or rnn.lstm
    batch, num_steps = tokens.shape
    hidden = cfg.num_hiddens
    # Layer 0 reads one-hot tokens: cuDNN's input GEMM does the row gather as a matmul (the
    # binding has no CUDNN_SKIP_INPUT mode); B*T*V*4H more products, ~1% at the big config.
    one_hot = jax.nn.one_hot(tokens, cfg.vocab_size, dtype=jnp.float32)
    seq_lengths = jnp.full((batch,), num_steps, jnp.int32)

    def call(x, layer_params, layer_states):
        h_0 = jnp.stack([h for _, h in layer_states])
        c_0 = jnp.stack([c for c, _ in layer_states])
        y, h_n, c_n = lstm(x, h_0, c_0, to_cudnn(layer_params), seq_lengths,
                           input_size=x.shape[-1], hidden_size=hidden,
                           num_layers=len(layer_params), dropout=0.0, bidirectional=False)
        return y, [(c_n[index], h_n[index]) for index in range(len(layer_params))]

    if not (cfg.dropout > 0 or cfg.residual or cfg.layer_norm):
        y, finals = call(one_hot, layers, states)
        return y, False, finals
    finals, top, x = [], None, one_hot
    for index, layer in enumerate(layers):
        y, final = call(x, [layer], [states[index]])
        finals += final
        top = stack.between_layers(cfg, y.transpose(1, 0, 2), top, index, train)
        x = top.transpose(1, 0, 2)
    return top, True, finals
