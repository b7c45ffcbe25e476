"""Generation: greedy output against step-by-step references, sampling, the compile cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprnn.errors import UsageError
from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.generation import choose_next, compiled_generator, generate

CFG = ModelConfig(vocab_size=9, num_hiddens=16, num_layers=2, cell="lstm")
PREFIX = np.array([3, 1, 4, 1, 5])


@pytest.fixture(scope="module")
def params():
    # Larger weights than the initialisation gives, so the greedy path visits several tokens.
    tree = init_params(CFG, jax.random.key(0))
    return jax.tree_util.tree_map(lambda a: a * 3.0, tree)


# The prefix length is data: 5 and 1 share the 16-token bucket, 17 takes the 32-token one.
@pytest.mark.parametrize("prefix", [PREFIX, np.array([7]), np.tile(PREFIX, 4)[:17]],
                         ids=["5", "1", "17"])
def test_greedy_is_deterministic_and_matches_step_by_step_references(params, prefix):
    length = 8
    tokens = generate(CFG, params, prefix, length)
    assert tokens.shape == (length,) and tokens.dtype == np.int32
    np.testing.assert_array_equal(generate(CFG, params, prefix, length), tokens)
    assert len(set(tokens.tolist())) > 1  # a path that actually moves

    apply = jax.jit(build_model(CFG).apply)
    # Reference 1, d2l's loop: one apply per character, the state carried by hand.
    logits, carry = apply(params, jnp.asarray(prefix[None], jnp.int32))
    stepwise = []
    for _ in range(length):
        stepwise.append(int(jnp.argmax(logits[0, -1])))
        logits, carry = apply(params, jnp.asarray([[stepwise[-1]]], jnp.int32), carry)
    # Reference 2, no carried state at all: rerun the whole text each time, from zeros. The
    # model is causal, so a zero-padded buffer of one shape (one compilation) does the same.
    rerun = np.zeros(len(prefix) + length, np.int32)
    rerun[:len(prefix)] = prefix
    for position in range(len(prefix), len(rerun)):
        logits, _ = apply(params, jnp.asarray(rerun[None]))
        rerun[position] = int(jnp.argmax(logits[0, position - 1]))
    np.testing.assert_array_equal(tokens, stepwise)
    np.testing.assert_array_equal(tokens, rerun[len(prefix):])


def test_sampling_follows_its_key(params):
    length, rng = 12, jax.random.key(7)
    sample = generate(CFG, params, PREFIX, length, temperature=1.0, rng=rng)
    np.testing.assert_array_equal(generate(CFG, params, PREFIX, length, 1.0, rng), sample)
    other = generate(CFG, params, PREFIX, length, temperature=1.0, rng=jax.random.key(8))
    assert (sample != other).any()
    assert ((0 <= sample) & (sample < CFG.vocab_size)).all()
    # The same draws by hand: token k from fold_in(rng, k) at the model's next-token logits.
    apply = jax.jit(build_model(CFG).apply)
    logits, carry = apply(params, jnp.asarray(PREFIX[None], jnp.int32))
    for k, token in enumerate(sample):
        want = choose_next(logits[:, -1], jnp.float32(1.0), jax.random.fold_in(rng, k))
        assert int(want[0]) == token
        logits, carry = apply(params, jnp.asarray([[token]], jnp.int32), carry)


def test_one_compilation_serves_repeated_calls_and_temperatures(params):
    generator = compiled_generator(CFG, 5)
    assert compiled_generator(CFG, 5) is generator
    generate(CFG, params, PREFIX, 5)
    generate(CFG, params, PREFIX, 5, temperature=0.5, rng=jax.random.key(1))
    generate(CFG, params, np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9 - 1]), 5)
    assert generator._cache_size() == 1  # a prefix of another length, the same compilation


def test_batched_core_equals_one_prefix_at_a_time(params):
    prefixes = np.array([[3, 1, 4], [2, 7, 1], [8, 8, 0]], np.int32)
    batched = compiled_generator(CFG, 6)(params, prefixes, np.int32(3), jnp.float32(0.0),
                                         jax.random.key(0))
    assert batched.shape == (3, 6) and batched.dtype == jnp.int32
    for row, prefix in zip(np.asarray(batched), prefixes, strict=True):
        np.testing.assert_array_equal(row, generate(CFG, params, prefix, 6))


def test_bad_prefix_is_a_usage_error(params):
    with pytest.raises(UsageError, match="non-empty"):
        generate(CFG, params, np.array([], np.int32), 4)
    with pytest.raises(UsageError, match="vocabulary"):
        generate(CFG, params, np.array([1, 9]), 4)
    assert generate(CFG, params, PREFIX, 0).shape == (0,)
