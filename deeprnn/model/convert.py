"""Parameters between the scratch layout and Flax's cells, where the equations agree.

scratch layer_{l}: W_x [in, G*H], W_h [H, G*H], b [G*H] (+ b_hn [H]), gate blocks side by side.
Flax keeps one Dense per gate and input/hidden side; where the two sides' biases add up, Flax
keeps only one of them, on the side written below:

    rnn   W_x -> i.kernel                   W_h -> h.kernel               b -> i.bias
    gru   W_x -> ir, iz, in .kernel         W_h -> hr, hz, hn .kernel     b -> ir, iz, in .bias
          b_hn -> hn.bias (inside the reset product, so it cannot merge into b)
    lstm  W_x -> ii, if, ig, io .kernel     W_h -> hi, hf, hg, ho .kernel b -> hi, hf, hg, ho .bias

The output layer and the layer norms have the same names and shapes in both.
The d2l-variant GRU has no Flax counterpart (its reset gate acts before the hidden matmul).
"""

import jax.numpy as jnp

from deeprnn.errors import UsageError

# Flax's Dense names per gate, (input side, hidden side), in the scratch gate order.
_FLAX_GATES = {
    "rnn": [("i", "h")],
    "gru": [("ir", "hr"), ("iz", "hz"), ("in", "hn")],
    "lstm": [("ii", "hi"), ("if", "hf"), ("ig", "hg"), ("io", "ho")],
}
_BIAS_SIDE = {"rnn": 0, "gru": 0, "lstm": 1}  # which Dense (input 0, hidden 1) holds b


def _check(config) -> None:
    if config.cell == "gru" and config.gru_variant == "d2l":
        raise UsageError("the d2l-variant GRU has no Flax counterpart: convert only "
                         "--gru_variant=cudnn checkpoints")


def _unwrap(params):
    return (params["params"], True) if "params" in params else (params, False)


def _other_layers(tree, config) -> dict:
    """Everything but the recurrent layers: output, layer norms (the same in both layouts)."""
    recurrent = {f"layer_{layer}" for layer in range(config.num_layers)}
    return {name: value for name, value in tree.items() if name not in recurrent}


def scratch_to_flax(params, config) -> dict:
    """scratch params ({"params": ...} or the bare tree) -> FlaxDeepRNN params, same wrapping."""
    _check(config)
    tree, wrapped = _unwrap(params)
    gates, bias_side = _FLAX_GATES[config.cell], _BIAS_SIDE[config.cell]
    out = _other_layers(tree, config)
    for layer in range(config.num_layers):
        scratch = tree[f"layer_{layer}"]
        w_x = jnp.split(jnp.asarray(scratch["W_x"]), len(gates), axis=-1)
        w_h = jnp.split(jnp.asarray(scratch["W_h"]), len(gates), axis=-1)
        b = jnp.split(jnp.asarray(scratch["b"]), len(gates))
        flax_layer = {}
        for gate, names in enumerate(gates):
            for side, kernel in ((0, w_x[gate]), (1, w_h[gate])):
                flax_layer[names[side]] = {"kernel": kernel}
            flax_layer[names[bias_side]]["bias"] = b[gate]
        if config.cell == "gru":
            flax_layer["hn"]["bias"] = jnp.asarray(scratch["b_hn"])
        out[f"layer_{layer}"] = flax_layer
    return {"params": out} if wrapped else out


def flax_to_scratch(params, config) -> dict:
    """FlaxDeepRNN params ({"params": ...} or the bare tree) -> scratch params, same wrapping."""
    _check(config)
    tree, wrapped = _unwrap(params)
    gates, bias_side = _FLAX_GATES[config.cell], _BIAS_SIDE[config.cell]
    out = _other_layers(tree, config)
    for layer in range(config.num_layers):
        flax_layer = tree[f"layer_{layer}"]

        def concat(side, leaf, layer_params=flax_layer):
            return jnp.concatenate([jnp.asarray(layer_params[names[side]][leaf])
                                   for names in gates], axis=-1)

        scratch = {"W_x": concat(0, "kernel"), "W_h": concat(1, "kernel"),
                   "b": concat(bias_side, "bias")}
        if config.cell == "gru":
            scratch["b_hn"] = jnp.asarray(flax_layer["hn"]["bias"])
        out[f"layer_{layer}"] = scratch
    return {"params": out} if wrapped else out
