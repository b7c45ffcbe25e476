"""A model from its ModelConfig: the implementation it names, its initial parameters, its size.

Every implementation (scratch, flax, fused) takes the same `__call__(tokens, carry=None, *,
train=False)` and starts from the same initialisation (deeprnn.model.cells), so results differ
only by schedule and float rounding: tests compare them output for output and gradient for
gradient.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprnn.model.config import ModelConfig
from deeprnn.model.convert import scratch_to_flax
from deeprnn.model.fused import FusedDeepRNN
from deeprnn.model.stack import FlaxDeepRNN, ScratchDeepRNN

IMPLEMENTATIONS = {"scratch": ScratchDeepRNN, "flax": FlaxDeepRNN, "fused": FusedDeepRNN}


def build_model(config: ModelConfig) -> nn.Module:
    """The model for config.impl; all share __call__(tokens, carry=None, *, train=False)."""
    return IMPLEMENTATIONS[config.impl](config)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """{"params": ...} in config.impl's layout, from the one initialisation (model.cells).

    The flax implementation gets the scratch initialisation converted (Flax's cells cannot set
    the LSTM forget bias alone), so that the two implementations start from the same point.
    """
    scratch = ScratchDeepRNN(dataclasses.replace(config, impl="scratch", lstm_kernel="auto"))
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = {"params": jax.jit(scratch.init)(rng, tokens)["params"]}
    if config.impl == "flax":
        return scratch_to_flax(params, config)
    return params


def count_params(params) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
