"""ModelConfig, what every implementation of the deep RNN is built from, and the one map from
a compute dtype's name to its JAX type."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from deeprnn.config import check_model
from deeprnn.errors import UsageError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """The JAX dtype of a --compute_dtype value (matmuls run in it; parameters stay float32)."""
    return COMPUTE_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_hiddens: int = 256
    num_layers: int = 2
    cell: str = "lstm"  # "rnn" | "gru" | "lstm"
    activation: str = "tanh"  # rnn only: "tanh" | "relu"
    gru_variant: str = "cudnn"  # "cudnn" | "d2l"
    dropout: float = 0.0
    residual: bool = False
    layer_norm: bool = False
    impl: str = "scratch"  # "scratch" | "flax" | "fused"
    lstm_kernel: str = "auto"  # fused only: "auto" | "fused" | "cudnn" (model/lstm_kernels.py)
    compute_dtype: str = "float32"  # "float32" | "bfloat16"; params always float32

    def __post_init__(self):
        check_model(**dataclasses.asdict(self))  # the same checks as the training flags
        if self.vocab_size < 1:
            raise UsageError(f"vocab_size={self.vocab_size} must be at least 1")

    @property
    def dtype(self) -> Any:
        return compute_dtype(self.compute_dtype)
