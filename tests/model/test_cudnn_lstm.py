"""The cuDNN kernel (`--lstm_kernel=cudnn`) against the scratch model, on the CPU.

cuDNN itself needs a CUDA GPU; here its binding is replaced by `lstm_ref`, jax.experimental.rnn's
own reference, reading the same packed vector through the binding's `unpack_lstm_weights`. That
checks the packing (layout, gate order, the one bias), the carry order, the one-hot first layer,
the per-layer path for the connections between layers, and the gradients in the logical layout.
The test at the end compares the binding itself with the reference where a GPU is present.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn

from deeprnn.config import model_flag_differences, parse_args
from deeprnn.errors import UsageError
from deeprnn.model import cudnn_lstm, lstm_kernels
from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.fused import FusedDeepRNN
from tests.model.equality import assert_close, outputs_and_grads, random_carry


@pytest.fixture(autouse=True)
def full_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _layers(config, key=0):
    tree = init_params(config, jax.random.PRNGKey(key))["params"]
    return [tree[f"layer_{index}"] for index in range(config.num_layers)]


def test_packing_is_the_layout_the_binding_unpacks():
    config = ModelConfig(vocab_size=5, num_hiddens=3, num_layers=2)
    layers = _layers(config)
    packed = cudnn_lstm.to_cudnn(layers)
    assert packed.shape == (rnn.get_num_params_in_lstm(5, 3, 2, False),)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(packed, 5, 3, 2, False)
    for index, layer in enumerate(layers):
        np.testing.assert_array_equal(w_ih[index], layer["W_x"].T)  # [4H, in], gates i,f,g,o
        np.testing.assert_array_equal(w_hh[index], layer["W_h"].T)
        np.testing.assert_array_equal(b_ih[index], layer["b"])
        np.testing.assert_array_equal(b_hh[index], 0.0)  # the one bias sits on the input side
    back = cudnn_lstm.from_cudnn(packed, 5, 3, 2)
    assert_close(back, layers, atol=0)


def test_weights_packed_elsewhere_read_back_to_the_same_model():
    """A vector from the binding's own initialiser (both biases non-zero), read back into the
    scratch layout, gives the scratch model the outputs lstm_ref gives on the vector."""
    vocab, hidden, layers = 6, 4, 2
    packed = rnn.init_lstm_weight(jax.random.PRNGKey(3), vocab, hidden, layers, False)
    config = ModelConfig(vocab_size=vocab, num_hiddens=hidden, num_layers=layers)
    params = init_params(config, jax.random.PRNGKey(0))
    for index, layer in enumerate(cudnn_lstm.from_cudnn(packed, vocab, hidden, layers)):
        params["params"][f"layer_{index}"] = layer
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, vocab)
    carry = random_carry(config, 2, jax.random.PRNGKey(2))
    logits, new_carry = build_model(config).apply(params, tokens, carry)

    ys, h_n, c_n = cudnn_lstm.packed_lstm_reference(
        jax.nn.one_hot(tokens, vocab), jnp.stack([h for _, h in carry]),
        jnp.stack([c for c, _ in carry]), packed, jnp.full((2,), 5, jnp.int32), vocab, hidden,
        layers, 0.0, False)
    out = params["params"]["output"]
    assert_close(logits, ys @ out["kernel"] + out["bias"])
    assert_close(new_carry, tuple((c_n[i], h_n[i]) for i in range(layers)))


@pytest.mark.parametrize("layers,extra", [(1, {}), (3, {}),
                                          (2, dict(dropout=0.3, residual=True,
                                                   layer_norm=True))])
def test_cudnn_kernel_equals_scratch(layers, extra):
    """Outputs, carries and gradients (parameters and carry) in float32, the whole stack in one
    call, and layer by layer when connections sit between the layers (training mode)."""
    config = ModelConfig(vocab_size=7, num_hiddens=8, num_layers=layers, **extra)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 7)
    carry = random_carry(config, 3, jax.random.PRNGKey(2))
    cudnn = FusedDeepRNN(dataclasses.replace(config, impl="fused", lstm_kernel="cudnn"),
                         packed_lstm=cudnn_lstm.packed_lstm_reference)
    assert cudnn.chosen_kernel(3) == "cudnn"
    rngs = {"dropout": jax.random.PRNGKey(7)}
    expected, got = outputs_and_grads([build_model(config), cudnn], params, tokens, carry,
                                       train=True, rngs=rngs)
    assert_close(got, expected)
    # Its parameter tree is the scratch one: checkpoints do not depend on the kernel.
    assert_close(cudnn.init(jax.random.PRNGKey(0), tokens), params, atol=0)


def test_cudnn_kernel_is_refused_where_it_cannot_run():
    config = ModelConfig(vocab_size=5, num_hiddens=4, impl="fused", lstm_kernel="cudnn")
    tokens = jnp.zeros((2, 3), jnp.int32)
    params = init_params(config, jax.random.PRNGKey(0))
    if jax.default_backend() != "gpu":
        with pytest.raises(UsageError, match="needs a CUDA GPU.*--lstm_kernel=auto"):
            FusedDeepRNN(config).apply(params, tokens)
    with pytest.raises(UsageError, match="float32 only"):
        dataclasses.replace(config, compute_dtype="bfloat16")
    with pytest.raises(UsageError, match="LSTM layers of --impl=fused only"):
        dataclasses.replace(config, cell="gru")
    with pytest.raises(UsageError, match="LSTM layers of --impl=fused only"):
        dataclasses.replace(config, impl="scratch")


def test_auto_picks_from_the_table_and_never_cudnn_off_a_gpu():
    choose = lstm_kernels.choose_lstm_kernel
    for measured in lstm_kernels.MEASURED:
        shape = dict(hidden=measured.hidden, batch=measured.batch)
        assert choose("auto", backend=measured.backend, dtype=measured.dtype,
                      **shape) == measured.winner
        for backend in ("cpu", "tpu"):
            assert choose("auto", backend=backend, dtype="float32", **shape) == "fused"
        assert choose("auto", backend="gpu", dtype="bfloat16", **shape) == "fused"
        assert choose("fused", backend="gpu", dtype="float32", **shape) == "fused"
    # The nearest measured step size decides: the d2l shape's and the big config's winners.
    assert choose("auto", backend="gpu", dtype="float32", hidden=256, batch=16) == "fused"
    assert choose("auto", backend="gpu", dtype="float32", hidden=2048, batch=512) == "cudnn"
    assert choose("auto", backend="gpu", dtype="float32", hidden=2048, batch=512,
                  table=()) == "fused"  # nothing measured: deeprnn's own kernel
    config = ModelConfig(vocab_size=5, num_hiddens=1024, impl="fused")
    if jax.default_backend() != "gpu":
        assert FusedDeepRNN(config).chosen_kernel(256) == "fused"


def test_the_kernel_is_a_run_flag_that_a_resume_may_change(tmp_path):
    config, _ = parse_args(["--lstm_kernel=cudnn", "--notensorboard"])
    assert config.lstm_kernel == "cudnn"
    saved = dataclasses.asdict(dataclasses.replace(config, lstm_kernel="fused"))
    assert model_flag_differences(saved, config) == []
    with pytest.raises(UsageError, match="no vmap rule"):
        parse_args(["--lstm_kernel=cudnn", "--num_seeds=2", "--notensorboard"])
    with pytest.raises(UsageError, match="--lstm_kernel"):
        parse_args(["--lstm_kernel=cuda", "--notensorboard"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a CUDA GPU")
def test_binding_equals_its_reference_and_the_scratch_model_on_a_gpu():
    config = ModelConfig(vocab_size=7, num_hiddens=8, num_layers=2)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 6), 0, 7)
    carry = random_carry(config, 3, jax.random.PRNGKey(2))
    cudnn = FusedDeepRNN(dataclasses.replace(config, impl="fused", lstm_kernel="cudnn"))
    reference = cudnn.clone(packed_lstm=cudnn_lstm.packed_lstm_reference)
    expected, *got = outputs_and_grads([build_model(config), cudnn, reference], params,
                                        tokens, carry)
    for result in got:
        assert_close(result, expected)
