"""Equality of implementations: one compiled function returning each model's outputs, carry
and gradients, and a tolerance check over whole trees (tests/model/test_fused.py,
test_cudnn_lstm.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn.model.stack import init_carry


def random_carry(config, batch, key):
    leaves, tree = jax.tree.flatten(init_carry(config, batch))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves, strict=True)])


def outputs_and_grads(models_, params, tokens, carry, train=False, rngs=None):
    """Per model: logits, new carry, and the gradient w.r.t. params and carry of a loss that
    reads both. All models in one compiled function (compiling is most of these tests' time)."""
    def one(model):
        def loss(params, carry):
            logits, new_carry = model.apply(params, tokens, carry, train=train, rngs=rngs)
            carry_term = sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(new_carry))
            return jnp.mean(logits ** 2) + carry_term, (logits, new_carry)

        grads, aux = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, carry)
        return aux, grads

    return jax.jit(lambda params, carry: [one(m) for m in models_])(params, carry)


def assert_close(a, b, atol=2e-5, rtol=1e-4):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
