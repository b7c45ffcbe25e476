"""The optimizer of a run: gradient clipping, then SGD (the book's) or Adam, under a
learning-rate schedule; optionally skipping updates whose gradient is not finite."""

from __future__ import annotations

import optax

from deeprnn.config import check_choice


def make_learning_rate(lr: float, schedule: str, num_train_steps: int, warmup_steps: int = 0):
    """An optax schedule; `constant` is the book's."""
    check_choice("lr_schedule", schedule)
    if schedule == "constant":
        return optax.constant_schedule(lr)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(num_train_steps, 1))
    if schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup_steps, 1), max(num_train_steps, warmup_steps + 1))
    raise AssertionError(f"{schedule} is in CHOICES but has no schedule here")


def make_optimizer(name: str, learning_rate, clip_norm: float, *,
                   skip_nonfinite: bool = False) -> optax.GradientTransformation:
    """Clip by global norm, then the optimizer, as one optax chain.

    With `skip_nonfinite`, an update whose gradient holds a NaN or inf is dropped (the
    parameters stay as they were) and optax counts it in the state.
    """
    check_choice("optimizer", name)
    opt = optax.sgd(learning_rate) if name == "sgd" else optax.adam(learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    if skip_nonfinite:
        # Large max_consecutive_errors: the caller decides when too many skips is fatal.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
    return tx
