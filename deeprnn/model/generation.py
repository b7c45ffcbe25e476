"""Text generation: warm the state up on a prefix, then emit tokens, all in one compiled call.

d2l's predict() calls the model once per character from a Python loop; here the prefix and the
emitted tokens are one lax.scan, so a whole sample is a single device call, compiled once for
every prefix up to a bucket length.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn.data.vocab import UNK_ID
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model
from deeprnn.model.config import ModelConfig
from deeprnn.model.stack import init_carry


def choose_next(logits: jax.Array, temperature: jax.Array, rng: jax.Array) -> jax.Array:
    """Next token per row of logits [B, V]: argmax at temperature 0, else a softmax sample.

    temperature is traced (one compiled function serves every temperature), so both branches
    are computed and one is selected; the max() keeps the unused branch free of inf / nan.
    Token 0, the vocabulary's <unk>, is never chosen: it stands for characters the model never
    saw, and printing "<unk>" in generated text says nothing.
    """
    logits = logits.at[..., UNK_ID].set(-jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def prefix_bucket(prefix_length: int) -> int:
    """The padded prefix length that one compiled generator serves: a power of two >= 16."""
    return max(16, 1 << (int(prefix_length) - 1).bit_length())


def sample_tokens(apply_fn, params, prefix_ids: jax.Array, prefix_length: jax.Array,
                  length: int, temperature: jax.Array, rng: jax.Array, carry) -> jax.Array:
    """The jit-friendly core: prefix_ids int32 [B, Pb] whose first prefix_length (>= 1, traced)
    columns are the prefix -> emitted int32 [B, length].

    One lax.scan of single-token steps reads the prefix while it lasts and then its own last
    choice, so the prefix length is data, not shape: one compilation serves every prefix that
    fits Pb (the CLI's prompts, the training loop's samples and the book's two lines). Step k
    chooses a token from its logits; the choice at step prefix_length - 1 + j is emitted token
    j, drawn with jax.random.fold_in(rng, j). Steps past the last emitted token are discarded.
    apply_fn(params, tokens, carry) -> (logits, carry) is a model's apply; `length` is static.
    """
    padded = prefix_ids.shape[1]

    def step(state, k):
        chosen, carry = state
        token = jnp.where(k < prefix_length, prefix_ids[:, jnp.minimum(k, padded - 1)], chosen)
        logits, carry = apply_fn(params, token[:, None], carry)
        index = jnp.maximum(k - (prefix_length - 1), 0)
        chosen = choose_next(logits[:, -1], temperature, jax.random.fold_in(rng, index))
        return (chosen, carry), chosen

    first = jnp.zeros(prefix_ids.shape[:1], jnp.int32)
    _, chosen = jax.lax.scan(step, (first, carry), jnp.arange(padded + length - 1))
    return jax.lax.dynamic_slice_in_dim(chosen.T, prefix_length - 1, length, axis=1)


@functools.lru_cache(maxsize=32)
def compiled_generator(config: ModelConfig, length: int):
    """jit(params, prefix_ids [B, Pb], prefix_length, temperature, rng) -> int32 [B, length],
    one per (config, length), so repeated samples (e.g. at every evaluation) reuse the
    compiled code; it compiles once per prefix bucket Pb (`prefix_bucket`).

    The caller keeps 1 <= prefix_length <= Pb (inside jit a wrong length is clamped, not
    refused: the tokens would be wrong) and passes it as np.int32, so that every call hits
    the same compilation; `generate` does both."""
    model = build_model(config)

    def apply_fn(params, tokens, carry):
        return model.apply(params, tokens, carry)

    @jax.jit
    def generator(params, prefix_ids, prefix_length, temperature, rng):
        carry = init_carry(config, prefix_ids.shape[0])
        return sample_tokens(apply_fn, params, prefix_ids, prefix_length, length, temperature,
                             rng, carry)

    return generator


def generate(config: ModelConfig, params, prefix_ids, length: int, temperature: float = 0.0,
             rng: jax.Array | None = None) -> np.ndarray:
    """Emit `length` token ids after the prefix: greedy at temperature 0, else sampled.

    prefix_ids: int [P], P >= 1. rng: a jax key, used only when temperature > 0
    (None means jax.random.key(0), so an unseeded sample is reproducible).
    """
    prefix = np.asarray(prefix_ids)
    if prefix.ndim != 1 or prefix.size == 0:
        raise UsageError("the prefix must be a non-empty 1-D array of token ids: pass at "
                         "least one character to warm the state up on")
    if prefix.min() < 0 or prefix.max() >= config.vocab_size:
        raise UsageError(f"prefix ids must lie in [0, {config.vocab_size}): encode the "
                         "prefix with the model's vocabulary")
    if length < 0 or not temperature >= 0 or not math.isfinite(temperature):
        raise UsageError(f"length={length} must not be negative and temperature={temperature} "
                         "must be a finite number >= 0")
    if length == 0:
        return np.zeros(0, np.int32)
    rng = jax.random.key(0) if rng is None else rng
    padded = np.zeros((1, prefix_bucket(prefix.size)), np.int32)
    padded[0, :prefix.size] = prefix
    tokens = compiled_generator(config, length)(
        params, padded, np.int32(prefix.size), jnp.float32(temperature), rng)
    return np.asarray(tokens[0])
