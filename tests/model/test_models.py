"""The deep model: wiring against a NumPy loop, scratch vs flax, state carry, dtypes, training."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeprnn.errors import UsageError
from deeprnn.model.build import build_model, count_params, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.convert import flax_to_scratch, scratch_to_flax
from deeprnn.model.stack import init_carry
from tests.model.numpy_reference import numpy_layer, numpy_zero_state, randomised, to_numpy_state

# vocab == hidden, so that a stack miswired to feed the raw one-hot input to upper layers still
# runs, and the test below can show that the reference tells the two wirings apart.
VOCAB = HIDDEN = 6


def numpy_model(cfg, params, tokens, state=None, wiring="correct"):
    """The stack by hand: layer l reads layer l-1's outputs; wiring="raw_input" is d2l's bug."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    one_hot = np.eye(cfg.vocab_size)[tokens]
    state = state or [numpy_zero_state(cfg.cell, len(tokens), cfg.num_hiddens)
                      for _ in range(cfg.num_layers)]
    x, final = one_hot, []
    for layer in range(cfg.num_layers):
        layer_input = one_hot if wiring == "raw_input" else x
        s, y = numpy_layer(cfg.cell, p[f"layer_{layer}"], layer_input, state[layer],
                           activation=cfg.activation, gru_variant=cfg.gru_variant)
        final.append(s)
        if cfg.residual and layer > 0:
            y = y + layer_input
        if layer < cfg.num_layers - 1 and cfg.layer_norm:
            norm = p[f"layer_norm_{layer}"]
            mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
            y = (y - mean) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
        x = y
    return x @ p["output"]["kernel"] + p["output"]["bias"], final


# L = 1..4 across the cells (each compiled model costs CPU seconds).
STACKS = [("lstm", 1, {}), ("lstm", 2, {}), ("gru", 3, {"gru_variant": "d2l"}),
          ("rnn", 4, {"activation": "relu"}), ("gru", 4, {"residual": True, "layer_norm": True})]


@pytest.mark.parametrize("cell,layers,extra", STACKS)
def test_stack_matches_numpy_layer_by_layer(cell, layers, extra):
    cfg = ModelConfig(vocab_size=VOCAB, num_hiddens=HIDDEN, num_layers=layers, cell=cell, **extra)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 5))
    params = randomised(init_params(cfg, jax.random.key(0)), seed=1)
    logits, carry = jax.jit(build_model(cfg).apply)(params, jnp.asarray(tokens, jnp.int32))
    want, want_carry = numpy_model(cfg, params, tokens)
    assert logits.shape == (2, 5, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           to_numpy_state(list(carry)), want_carry)
    if layers > 1:  # the check above would catch d2l's wiring bug: it changes the logits a lot
        miswired, _ = numpy_model(cfg, params, tokens, wiring="raw_input")
        assert np.abs(miswired - want).max() > 0.1


def loss_with_carry(apply_fn, params, tokens, carry=None):
    """Cross-entropy plus a term on the final state, so gradients cover the carry path too."""
    logits, carry = apply_fn(params, tokens, carry)
    targets = jnp.roll(tokens, -1, axis=1)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return xent + 0.1 * sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(carry))


@pytest.mark.parametrize("cell,layers,extra", [
    ("rnn", 2, {}), ("gru", 4, {}), ("lstm", 1, {}),
    ("lstm", 4, {"residual": True, "layer_norm": True})])
def test_scratch_and_flax_agree_after_conversion(cell, layers, extra):
    cfg = ModelConfig(vocab_size=7, num_hiddens=5, num_layers=layers, cell=cell, **extra)
    flax_cfg = dataclasses.replace(cfg, impl="flax")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, size=(3, 6)), jnp.int32)
    scratch_params = randomised(init_params(cfg, jax.random.key(0)), seed=2)
    flax_params = scratch_to_flax(scratch_params, cfg)
    # The converted tree is exactly the one the Flax model builds, and init_params gives it too.
    flax_model = build_model(flax_cfg)
    flax_shapes = jax.eval_shape(flax_model.init, jax.random.key(0), tokens)
    shape_of = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)
    assert shape_of(flax_shapes) == shape_of(flax_params)
    assert shape_of(init_params(flax_cfg, jax.random.key(0))) == shape_of(flax_params)

    def value_and_grad(model, params):
        return jax.jit(jax.value_and_grad(lambda p: loss_with_carry(model.apply, p, tokens)))(
            params)

    loss, grads = value_and_grad(build_model(cfg), scratch_params)
    flax_loss, flax_grads = value_and_grad(flax_model, flax_params)
    np.testing.assert_allclose(flax_loss, loss, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           flax_to_scratch(flax_grads, cfg), grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           flax_to_scratch(flax_params, cfg), scratch_params)


@pytest.mark.parametrize("cell,extra", [("rnn", {}), ("gru", {"gru_variant": "d2l"}),
                                        ("lstm", {"impl": "flax"})])
def test_carried_state_halves_equal_whole(cell, extra):
    cfg = ModelConfig(vocab_size=VOCAB, num_hiddens=HIDDEN, num_layers=2, cell=cell, **extra)
    model = build_model(cfg)
    apply = jax.jit(model.apply)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(2, 8)), jnp.int32)
    params = init_params(cfg, jax.random.key(0))
    whole, whole_carry = apply(params, tokens, init_carry(cfg, 2))
    first, carry = apply(params, tokens[:, :4])
    second, carry = apply(params, tokens[:, 4:], carry)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           carry, whole_carry)


@pytest.mark.parametrize("impl", ["scratch", "flax"])
def test_bfloat16_shapes_and_dtypes(impl):
    cfg = ModelConfig(vocab_size=VOCAB, num_hiddens=8, num_layers=2, cell="gru", impl=impl,
                      compute_dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(3, 5)), jnp.int32)
    params = init_params(cfg, jax.random.key(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    model = build_model(cfg)
    logits, carry = jax.jit(model.apply)(params, tokens)
    assert logits.shape == (3, 5, VOCAB) and logits.dtype == jnp.float32
    assert [(c.shape, c.dtype) for c in carry] == [((3, 8), jnp.float32)] * 2
    f32_model = build_model(dataclasses.replace(cfg, compute_dtype="float32"))
    want, _ = jax.jit(f32_model.apply)(params, tokens)
    np.testing.assert_allclose(logits, want, atol=5e-2)
    grads = jax.jit(jax.grad(lambda p: loss_with_carry(model.apply, p, tokens)))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_dropout_only_when_training():
    cfg = ModelConfig(vocab_size=VOCAB, num_hiddens=HIDDEN, num_layers=3, cell="lstm",
                      dropout=0.5)
    model, tokens = build_model(cfg), jnp.zeros((2, 4), jnp.int32)
    params = init_params(cfg, jax.random.key(0))
    plain, _ = jax.jit(build_model(dataclasses.replace(cfg, dropout=0.0)).apply)(params, tokens)
    np.testing.assert_array_equal(jax.jit(model.apply)(params, tokens)[0], plain)
    train_apply = jax.jit(functools.partial(model.apply, train=True))
    drop = lambda seed: train_apply(params, tokens, rngs={"dropout": jax.random.key(seed)})[0]
    assert np.abs(drop(1) - plain).max() > 1e-3
    assert np.abs(drop(1) - drop(2)).max() > 1e-3
    np.testing.assert_array_equal(drop(1), drop(1))


@pytest.mark.parametrize("bad,fix", [
    ({"cell": "lsmt"}, "--cell"), ({"impl": "flax", "cell": "gru", "gru_variant": "d2l"},
                                   "gru_variant=cudnn"),
    ({"num_layers": 0}, "--num_layers"), ({"dropout": 1.0}, "--dropout"),
    ({"compute_dtype": "float16"}, "--compute_dtype")])
def test_bad_config_is_a_usage_error(bad, fix):
    with pytest.raises(UsageError, match=fix):
        ModelConfig(vocab_size=5, **bad)


def test_parameter_count_of_d2l_lstm_next_to_pytorch():
    """2-layer 256-unit LSTM, vocab 28: one bias per gate here, two (b_ih, b_hh) in PyTorch."""
    vocab, hidden, layers = 28, 256, 2
    cfg = ModelConfig(vocab_size=vocab, num_hiddens=hidden, num_layers=layers, cell="lstm")
    ours = count_params(jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0)))
    inputs = [vocab] + [hidden] * (layers - 1)
    pytorch = sum(4 * hidden * (n + hidden) + 8 * hidden for n in inputs) + hidden * vocab + vocab
    assert (ours, pytorch) == (824_348, 826_396)
    assert pytorch - ours == layers * 4 * hidden  # exactly PyTorch's second bias vector


TEXT = ("the time machine was a story of a traveller who went far into the future and came "
        "back to tell his friends about the strange people he had met there. the morlocks "
        "lived below the ground and the eloi lived above it in the sun. ") * 4


@pytest.mark.parametrize("cell,extra,lr", [
    ("rnn", {"activation": "tanh"}, 1.0), ("rnn", {"activation": "relu"}, 1.0),
    ("gru", {}, 2.0), ("gru", {"gru_variant": "d2l"}, 2.0), ("lstm", {}, 2.0)])
def test_eight_layers_train_without_divergence(cell, extra, lr):
    """SGD at the book's rates (1 for the plain rnn, 2 for gated cells), clipping at 1."""
    chars = sorted(set(TEXT))
    ids = np.array([chars.index(c) for c in TEXT])
    batch, steps_per_window, num_steps = 8, 10, 30
    starts = np.random.default_rng(0).integers(0, len(ids) - steps_per_window - 1,
                                               size=(num_steps, batch))
    windows = ids[starts[..., None] + np.arange(steps_per_window + 1)]
    cfg = ModelConfig(vocab_size=len(chars), num_hiddens=16, num_layers=8, cell=cell, **extra)
    model, tx = build_model(cfg), optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr))

    def loss_fn(params, window):
        logits, _ = model.apply(params, window[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()

    @jax.jit
    def train(params, windows):
        def step(state, window):
            params, opt_state = state
            loss, grads = jax.value_and_grad(loss_fn)(params, window)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        params_and_opt = (params, tx.init(params))
        return jax.lax.scan(step, params_and_opt, jnp.asarray(windows, jnp.int32))[1]

    losses = np.asarray(train(init_params(cfg, jax.random.key(0)), windows))
    assert np.isfinite(losses).all()
    assert losses.max() < losses[0] + 0.5, losses  # no spike
    assert losses[-5:].mean() < losses[:5].mean() - 0.15, losses  # and it learns
