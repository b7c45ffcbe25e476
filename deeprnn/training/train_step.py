"""Pure training and evaluation steps: what every device runs, one batch at a time.

Metrics leave a step as sums and token counts, never as means, so that perplexity over any
span of steps (or any number of devices) is exp(total loss / total tokens). d2l's JAX version
plots a mean of per-batch perplexities instead, which overstates perplexity.

The per-device step is written once. Under data parallelism `axis_name` names the device axis
and the gradients are averaged across it *before* clipping, so clipping sees the global
gradient, exactly as on one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key for dropout; each step folds in its step number


def reset_carry(carry, reset):
    """Zero the carried RNN state where `reset` is true (a new epoch or a random window)."""
    return jax.tree.map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def token_losses(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, x, y, carry, reset, *, apply_fn: Callable,
               tx: optax.GradientTransformation, axis_name: str | None = None,
               skip_nonfinite: bool = False):
    """One SGD step on a [B, T] batch. Returns (state, carry, metrics).

    The carry comes out detached (stop_gradient): d2l's sequential sampler carries the state
    across batches but never backpropagates into the previous batch.
    """
    carry = reset_carry(carry, reset)
    # Each device's rows get their own dropout masks; one device (or a vmapped seed) is
    # device 0, so every path draws the same masks for the same rows.
    device = jax.lax.axis_index(axis_name) if axis_name is not None else 0
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device)

    def loss_fn(params):
        logits, new_carry = apply_fn(params, x, carry, train=True, rngs={"dropout": dropout_rng})
        losses = token_losses(logits, y)
        return losses.mean(), (losses.sum(), new_carry)

    (_, (loss_sum, new_carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tokens = jnp.asarray(y.size, jnp.float32)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss_sum = jax.lax.psum(loss_sum, axis_name)
        tokens = jax.lax.psum(tokens, axis_name)
    if skip_nonfinite:
        # A non-finite loss can come with finite gradients (huge parameters whose logits
        # overflow): the update is then poisoned too, so that optax.apply_if_finite
        # (--nan_policy=skip) skips it. Under --nan_policy=stop the host stops the run at this
        # step's loss anyway, and the step saves the pass over every gradient.
        grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss_sum), g, jnp.nan), grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # 1 for a step whose loss or gradient was not finite: the update --nan_policy=skip drops.
    # The norm is not finite exactly when a gradient is not (barring an overflow of the sum of
    # squares past 3e38, which clipping makes moot), so no second pass over the gradients.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    nonfinite = 1.0 - finite.astype(jnp.float32)
    metrics = {"loss_sum": loss_sum, "tokens": tokens, "grad_norm": grad_norm,
               "nonfinite": nonfinite}
    return state, jax.lax.stop_gradient(new_carry), metrics


def eval_step(params, x, y, mask, carry, *, apply_fn: Callable, axis_name: str | None = None):
    """Scores the masked tokens of one evaluation batch; the carry flows on to the next."""
    logits, new_carry = apply_fn(params, x, carry, train=False)
    loss_sum = (token_losses(logits, y) * mask).sum()
    tokens = mask.sum()
    if axis_name is not None:
        loss_sum = jax.lax.psum(loss_sum, axis_name)
        tokens = jax.lax.psum(tokens, axis_name)
    return new_carry, {"loss_sum": loss_sum, "tokens": tokens}


def summarize(loss_sum: float, tokens: float) -> dict[str, float]:
    """Loss, perplexity and bits per character from summed metrics."""
    loss = loss_sum / max(tokens, 1.0)
    # exp overflows a float past a loss of ~709.78: inf then, not an error and not 1e304.
    perplexity = math.exp(loss) if loss < 709.0 else (math.inf if loss > 0 else math.nan)
    return {"loss": loss, "perplexity": perplexity, "bits_per_char": loss / math.log(2.0)}


def train_steps(state: TrainState, xs, ys, carry, resets, *, apply_fn: Callable,
                tx: optax.GradientTransformation, axis_name: str | None = None,
                skip_nonfinite: bool = False):
    """`len(xs)` training steps in one call (a lax.scan over stacked batches).

    Running several steps per jitted call keeps the host out of the loop; the per-step
    metrics come back stacked, so every step still reaches the logs.
    """
    def one(carried, batch):
        state, carry = carried
        x, y, reset = batch
        state, carry, metrics = train_step(state, x, y, carry, reset, apply_fn=apply_fn, tx=tx,
                                           axis_name=axis_name, skip_nonfinite=skip_nonfinite)
        return (state, carry), metrics

    (state, carry), metrics = jax.lax.scan(one, (state, carry), (xs, ys, resets))
    return state, carry, metrics
