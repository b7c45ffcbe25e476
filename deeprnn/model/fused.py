"""The fast path (`impl="fused"`): the scratch model's math, scheduled for the accelerator.

Same parameters, outputs and gradients as the scratch model; what changes is the schedule:

- Layer 0's input projection for every time step is one row gather of W_x (the input is
  one-hot), done before the recurrence.
- Wavefront: one `lax.scan` over T + L - 1 diagonals. At diagonal d layer l runs time
  t = d - l, so all layers advance together through one batched matmul over layers, and the
  chain of dependent cell steps is T + L - 1 long instead of L * T. Layer l reads layer l-1's
  state from the previous diagonal, which is exactly its input at time t.
- Layerwise (the alternative schedule): per layer, the input projection of all time steps is
  one large matmul, and the scan carries only h @ W_h. It wins at shallow depth (one fewer
  matmul in the serial chain per step) and carries dropout / residual / layer norm between
  layers, which the wavefront does not.
- A hand-written VJP for the recurrence: the backward scan emits the gate gradients of every
  step and the weight gradients become one large matmul over all steps afterwards, instead of
  a small [H, B] x [B, G*H] product accumulated inside every backward step. The elementwise
  cell is still differentiated by JAX (jax.vjp inside the backward scan), so the hand part is
  only the linear algebra. (H200, d2l shape: 1.66 ms/step against 1.90 with JAX's own scan
  gradient.) The d2l GRU variant, whose cell holds a second matmul, keeps JAX's gradient.
- LSTM stacks on the layerwise schedule use fused_lstm.py, whose backward is written out
  in full (no cell re-run, one gate-gradient buffer): the same speed on the 2-core CPU, a third
  less memory (XLA's buffer total for the gradient of the big config: 10.3 GB -> 6.9 GB).
- LSTM stacks may instead run through cuDNN (cudnn_lstm.py), from the same parameters:
  `lstm_kernel` ("auto" picks per backend and shape, lstm_kernels.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprnn.errors import UsageError
from deeprnn.model import cells, cudnn_lstm, fused_lstm, lstm_kernels, stack
from deeprnn.model.config import ModelConfig, compute_dtype

GATES = cells.GATES
LAYER_SCHEDULES = ("auto", "wavefront", "layerwise")

# Accelerators: from this depth up the wavefront wins. deeprnn.bench on an H200 (d2l shape,
# float32, 10 steps per call, ms/step): 2 layers layerwise-unroll-8 1.66 vs wavefront 1.86
# (unroll 2) / 2.18 (unroll 1); 4 layers wavefront 2.81-3.00 vs layerwise-unroll-8 3.31.
# Measured at the d2l shape only: large, compute-bound shapes may prefer layerwise.
WAVEFRONT_MIN_LAYERS = 4
# Scan unroll by (backend, schedule). GPU (H200, d2l shape): layerwise unroll 8 1.66 ms, 4 1.75,
# 1 2.47; the wavefront was timed at unroll 1 at 4 layers (where it wins) and at 1 and 2 at 2
# layers (2 was faster). The CPU's layerwise entries are fallbacks: see CPU_MAX_UNROLL.
DEFAULT_UNROLL = {("cpu", "layerwise"): 2, ("cpu", "wavefront"): 1,
                  ("gpu", "layerwise"): 8, ("gpu", "wavefront"): 1}
# bfloat16 on the CPU: unroll 1 where no divisor applies (see CPU_MAX_UNROLL). Same-run A/B
# of layerwise:1 against unroll 2 (bench --fused_variants=layerwise:1, 2-core AMD EPYC with
# avx512_bf16, November 2026, commit 51cbbbe): fused 0.97 / 0.95 with the machine quiet, 0.80-0.88
# under load 2-4; the floor 0.94 quiet.
DTYPE_UNROLL = {("cpu", "layerwise", "bfloat16"): 1}
# The CPU's layerwise schedule, both dtypes: the largest unroll up to 8 that divides the number
# of steps. jax.lax.scan runs the steps an unroll leaves over after the loop, which slices every
# scanned input apart and concatenates every stacked output back: [T, B, 4H] copies that cost
# more than the unroll saves. 2-core CPU, d2l shape (H 256, L 2, B 32), 30 Nov 2026, commit
# 3ef2c38. float32, the fused LSTM step over the matmul floor's (unroll 2) in one run: T = 35,
# unroll 1 / 2 / 5 / 7 / 8: 1.29 / 1.15-1.18 / 1.06-1.07 / 1.02-1.11 / 1.19; T = 48, unroll
# 2 / 4 / 6 / 8: 0.98 / 0.97 / 0.96 / 0.93; T = 37 (prime), unroll 1 / 2 / 4 / 8: 1.35 / 1.22 /
# 1.20 / 1.20; the GRU and the vanilla RNN at T = 35 likewise (over the floor: GRU unroll
# 1 / 2 / 5 / 7: 1.64 / 1.74 / 1.43 / 1.48; RNN 0.99 / 1.23 / 1.01 / 1.03); deeprnn.bench
# --fused_variants at T = 35, two runs: unroll 7 18.7 / 20.0 ms, 5 19.5 / 20.9, 2 20.7 / 22.1.
# bfloat16 at T = 35, three runs: unroll 7 0.96x the time of unroll 1 each time (15.2-15.9 ms);
# the floor 1.00-1.02x; the GRU 0.88x (one run). The exceptions seen: the vanilla RNN in
# bfloat16, unroll 7 1.02-1.03x the time of unroll 1 (three runs, 5.0-9.7 ms), and the mid
# config (H 512, L 3, B 128, T 64, float32), where matmuls dominate: unroll 8 790.9 ms against
# 778.7 at 2 (one run). With no divisor up to 8 (a prime T) the entries above apply.
CPU_MAX_UNROLL = 8


def default_unroll(schedule: str, dtype: str = "float32", num_steps: int | None = None) -> int:
    """The scan unroll for this backend, schedule and compute dtype; on a CPU (layerwise), one
    that divides num_steps where there is one (CPU_MAX_UNROLL)."""
    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    if (backend, schedule) == ("cpu", "layerwise") and num_steps:
        divisors = [d for d in range(2, CPU_MAX_UNROLL + 1) if num_steps % d == 0]
        if divisors:
            return divisors[-1]
    return DTYPE_UNROLL.get((backend, schedule, dtype), DEFAULT_UNROLL[(backend, schedule)])


_mm = fused_lstm.mm


# ---------------------------------------------------------------- elementwise cell updates

def _cell_update(cell, activation, gru_variant, gx, gh, state, w_hn=None, dtype=jnp.float32):
    """One step of every layer at once. gx, gh: [L, B, G*H] pre-activations from the input
    and from the state (biases already added); state: tuple of [L, B, H]. Returns the new state.
    """
    if cell == "rnn":
        act = jnp.tanh if activation == "tanh" else jax.nn.relu
        return (act(gx + gh),)
    if cell == "lstm":
        c, _ = state
        i, f, g, o = jnp.split(fused_lstm.lstm_gates(gx + gh), 4, axis=-1)
        c = f * c + i * g
        return (c, o * jnp.tanh(c))
    (h,) = state
    xr, xz, xn = jnp.split(gx, 3, axis=-1)
    hr, hz, hn = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    if gru_variant == "cudnn":
        n = jnp.tanh(xn + r * hn)  # hn carries b_hn: cuDNN's n = tanh(W x + b + r * (U h + b_hn))
    else:  # d2l: n = tanh(W x + (r * h) U + b): the reset gate acts before the matmul
        n = jnp.tanh(xn + _mm("lbh,lhg->lbg", r * h, w_hn, dtype))
    return (z * h + (1.0 - z) * n,)


def _masked(active, new, old):
    """Keep layers outside the wavefront (not started or finished) exactly as they were."""
    if active is None:
        return new
    return tuple(jnp.where(active[:, None, None], n, o) for n, o in zip(new, old, strict=True))


def _active_layers(num_diagonals, num_layers, num_steps):
    """[D, L] bool: layer l is running at diagonal d when 0 <= d - l < T."""
    d = jnp.arange(num_diagonals)[:, None]
    layer = jnp.arange(num_layers)[None, :]
    return (d >= layer) & (d - layer < num_steps)


# ---------------------------------------------------------------- the recurrence core

@functools.cache
def make_recurrence(cell, activation, gru_variant, compute_dtype_name, num_steps, unroll,
                    hand_vjp=True):
    """The scan over diagonals as a function with a hand-written VJP (see module docstring).

    recurrence(xs [D,B,GH], w_h [L,H,GH], b_h [L,GH], w_up [L-1,H,GH], b_up [L-1,GH], state)
      -> (top-layer h per diagonal [D,B,H], final state)
    xs is layer 0's input pre-activation (bias included) per diagonal; layers >= 1 read the
    state of the layer below through w_up. With L = 1 this is a plain hoisted scan.
    The d2l GRU variant (a second matmul inside the cell) uses plain autodiff.
    """
    dtype = compute_dtype(compute_dtype_name)
    update = functools.partial(_cell_update, cell, activation, gru_variant, dtype=dtype)

    def matmuls(h, w_h, b_h, w_up, b_up):
        gh = _mm("lbh,lhg->lbg", h, w_h, dtype) + b_h[:, None]
        gup = _mm("lbh,lhg->lbg", h[:-1], w_up, dtype) + b_up[:, None]
        return gh, gup

    def forward(xs, w_h, b_h, w_up, b_up, state, w_hn, keep_residuals):
        masked = w_h.shape[0] > 1  # one layer never leaves the wavefront: no masking
        active = _active_layers(xs.shape[0], w_h.shape[0], num_steps)

        def step(state, inputs):
            x, act = inputs
            gh, gup = matmuls(state[-1], w_h, b_h, w_up, b_up)
            gx = jnp.concatenate([x[None], gup], axis=0)
            new = _masked(act if masked else None, update(gx, gh, state, w_hn), state)
            return new, (new[-1][-1], (state, gh, gup) if keep_residuals else None)

        final, (ys, residuals) = jax.lax.scan(step, state, (xs, active), unroll=unroll)
        return ys, final, residuals

    if not hand_vjp or (cell == "gru" and gru_variant == "d2l"):
        def plain(xs, w_h, b_h, w_up, b_up, state, w_hn):
            ys, final, _ = forward(xs, w_h, b_h, w_up, b_up, state, w_hn, False)
            return ys, final
        return plain

    @jax.custom_vjp
    def recurrence(xs, w_h, b_h, w_up, b_up, state, w_hn):
        ys, final, _ = forward(xs, w_h, b_h, w_up, b_up, state, w_hn, False)
        return ys, final

    def fwd(xs, w_h, b_h, w_up, b_up, state, w_hn):
        ys, final, residuals = forward(xs, w_h, b_h, w_up, b_up, state, w_hn, True)
        return (ys, final), (xs, w_h, w_up, residuals)

    def bwd(saved, cotangents):
        xs, w_h, w_up, (states, ghs, gups) = saved
        dys, dfinal = cotangents
        masked = w_h.shape[0] > 1
        active = _active_layers(xs.shape[0], w_h.shape[0], num_steps)
        # Transposed once, outside the loop: XLA:CPU would otherwise fold the transpose into
        # every step's dot, and that transposed-operand dot is slower (d2l shape: 206 -> 160 us).
        w_h_t, w_up_t = (jax.lax.optimization_barrier(w.swapaxes(1, 2)) for w in (w_h, w_up))

        def back_step(dstate, inputs):
            x, prev, gh, gup, dy, act = inputs
            act = act if masked else None
            # The diagonal's top-layer output is also a carry output: add its cotangent.
            dstate = dstate[:-1] + (dstate[-1].at[-1].add(dy),)
            gx = jnp.concatenate([x[None], gup], axis=0)
            _, cell_vjp = jax.vjp(lambda gx, gh, s: _masked(act, update(gx, gh, s), s),
                                  gx, gh, prev)
            dgx, dgh, dprev = cell_vjp(dstate)
            dgup = dgx[1:]
            dh = dprev[-1] + _mm("lbg,lgh->lbh", dgh, w_h_t, dtype)
            dh = dh.at[:-1].add(_mm("lbg,lgh->lbh", dgup, w_up_t, dtype))
            return dprev[:-1] + (dh,), (dgx[0], dgh, dgup)

        dstate0, (dxs, dghs, dgups) = jax.lax.scan(
            back_step, dfinal, (xs, states, ghs, gups, dys, active), reverse=True,
            unroll=unroll)
        # Weight gradients: one large matmul over all diagonals instead of one per step.
        h_prev = states[-1]  # [D, L, B, H]
        dw_h = _mm("dlbh,dlbg->lhg", h_prev, dghs, dtype)
        dw_up = _mm("dlbh,dlbg->lhg", h_prev[:, :-1], dgups, dtype)
        return (dxs, dw_h, dghs.sum((0, 2)), dw_up, dgups.sum((0, 2)), dstate0, None)

    recurrence.defvjp(fwd, bwd)
    return recurrence


# ---------------------------------------------------------------- the model

class FusedDeepRNN(nn.Module):
    """Drop-in for the scratch model: same __call__, same parameter tree, faster schedule.

    schedule: "auto" picks by depth and features (WAVEFRONT_MIN_LAYERS; dropout, residual and
    layer norm need the layerwise schedule), or force "wavefront" / "layerwise".
    unroll: scan unroll; None takes default_unroll for the backend, schedule, dtype and
      number of steps.
    """

    config: ModelConfig
    schedule: str = "auto"
    unroll: int | None = None
    hand_vjp: bool = True  # False: JAX differentiates the scan (kept to measure the difference)
    # False: LSTM layers take the general recurrence instead of fused_lstm (same
    # results; kept to measure the difference, as `--fused_variants=...:generic` does)
    lstm_layer: bool = True
    # The cuDNN kernel's function, jax.experimental.rnn.lstm's signature; None is that binding.
    # Tests pass cudnn_lstm.packed_lstm_reference to run the cuDNN path on a CPU.
    packed_lstm: Callable | None = None

    def chosen_kernel(self, batch: int) -> str:
        """"fused" or "cudnn" for this config's LSTM layers (config.lstm_kernel, resolved)."""
        cfg = self.config
        if cfg.cell != "lstm" or not (self.hand_vjp and self.lstm_layer):
            return "fused"  # the bench's autodiff / generic variants measure the fused path
        backend = jax.default_backend()
        kernel = lstm_kernels.choose_lstm_kernel(cfg.lstm_kernel, backend=backend,
                                                 dtype=cfg.compute_dtype,
                                                 hidden=cfg.num_hiddens, batch=batch)
        if self.packed_lstm is None:
            lstm_kernels.check_backend(kernel, backend)
        return kernel

    def chosen_schedule(self) -> str:
        cfg = self.config
        if self.schedule not in LAYER_SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; use one of {LAYER_SCHEDULES}")
        if cfg.dropout > 0 or cfg.residual or cfg.layer_norm or cfg.num_layers == 1:
            return "layerwise"
        if self.schedule == "auto":
            # On a CPU the step is bound by matmul throughput, not by the chain of dependent
            # steps, and the wavefront's masking only adds work: layerwise always.
            deep = cfg.num_layers >= WAVEFRONT_MIN_LAYERS and jax.default_backend() != "cpu"
            return "wavefront" if deep else "layerwise"
        return self.schedule

    @nn.compact
    def __call__(self, tokens, carry=None, *, train: bool = False):
        cfg = self.config
        num_layers, hidden = cfg.num_layers, cfg.num_hiddens
        gate_width = GATES[cfg.cell] * hidden
        batch, num_steps = tokens.shape
        layers = declare_layers(cfg)
        if carry is None:
            carry = stack.init_carry(cfg, batch)
        if len(carry) != num_layers:
            raise UsageError(f"carry has {len(carry)} layers, the model {num_layers}: "
                             "pass init_carry(config, batch_size)")
        states = [tuple(c) if cfg.cell == "lstm" else (c,) for c in carry]
        if self.chosen_kernel(batch) == "cudnn":
            top, time_major, finals = cudnn_lstm.cudnn_layers(cfg, layers, tokens, states,
                                                              train, self.packed_lstm)
            logits = stack.OutputLayer(cfg.vocab_size, cfg.dtype, name="output")(top)
            return (logits.transpose(1, 0, 2) if time_major else logits), tuple(finals)
        schedule = self.chosen_schedule()
        unroll = self.unroll or default_unroll(schedule, cfg.compute_dtype, num_steps)
        recurrence = make_recurrence(cfg.cell, cfg.activation, cfg.gru_variant, cfg.compute_dtype,
                                     num_steps, unroll, self.hand_vjp)
        dtype = cfg.dtype

        def recurrent_bias(layer):
            # cuDNN GRU: b_hn sits inside the reset gate's product, so it joins U h.
            if cfg.cell == "gru" and cfg.gru_variant == "cudnn":
                return jnp.concatenate([jnp.zeros((2 * hidden,)), layer["b_hn"]])
            return jnp.zeros((gate_width,))

        def w_hn(selected):
            if cfg.cell == "gru" and cfg.gru_variant == "d2l":
                return jnp.stack([layer["W_h"][:, 2 * hidden:] for layer in selected])
            return None

        # Layer 0 reads a one-hot token: its input projection is a row gather, all steps at once.
        # The cast rounds the rows as a bfloat16 matmul would (as the scratch cells do).
        x0 = layers[0]["W_x"][tokens.T].astype(dtype).astype(jnp.float32)
        if schedule == "wavefront":
            xs = jnp.pad(x0 + layers[0]["b"], ((0, num_layers - 1), (0, 0), (0, 0)))
            stacked = tuple(jnp.stack(parts) for parts in zip(*states, strict=True))
            ys, final = recurrence(
                xs, jnp.stack([p["W_h"] for p in layers]),
                jnp.stack([recurrent_bias(p) for p in layers]),
                jnp.stack([p["W_x"] for p in layers[1:]]),
                jnp.stack([p["b"] for p in layers[1:]]), stacked, w_hn(layers))
            top = ys[num_layers - 1:]
            finals = [tuple(part[index] for part in final) for index in range(num_layers)]
        else:
            finals, top, xs = [], None, x0
            # The LSTM has its backward written out (fused_lstm.py); other cells use the
            # general recurrence with one layer.
            lstm_layer = (fused_lstm.make_lstm_layer(cfg.compute_dtype, unroll)
                          if cfg.cell == "lstm" and self.hand_vjp and self.lstm_layer
                          else None)
            project = fused_lstm.make_projection(cfg.compute_dtype)
            no_w = jnp.zeros((0, hidden, gate_width))
            no_b = jnp.zeros((0, gate_width))
            for index, layer in enumerate(layers):
                if index > 0:
                    xs = project(top, layer["W_x"])
                if lstm_layer is not None:  # adds the bias inside its step
                    ys, final = lstm_layer(xs, layer["W_h"], layer["b"], *states[index])
                    finals.append(final)
                else:
                    state = tuple(part[None] for part in states[index])
                    ys, final = recurrence(xs + layer["b"], layer["W_h"][None],
                                           recurrent_bias(layer)[None],
                                           no_w, no_b, state, w_hn([layer]))
                    finals.append(tuple(part[0] for part in final))
                top = stack.between_layers(cfg, ys, top, index, train)
        # The scratch model's output layer, time-major, then one transpose of the small logits.
        logits = stack.OutputLayer(cfg.vocab_size, cfg.dtype, name="output")(top)
        logits = logits.transpose(1, 0, 2)
        new_carry = tuple(f if cfg.cell == "lstm" else f[0] for f in finals)
        return logits, new_carry


# ---------------------------------------------------------------- parameters and carry
# The scratch cells declare the parameters (their setup, their initialisers, their order), so
# FusedDeepRNN.init and the scratch model's init give the same tree from the same key; these
# subclasses only hand the parameter arrays over instead of running a time step.

def _hand_over(cell):
    layer = {"W_x": cell.W_x, "W_h": cell.W_h, "b": cell.b}
    if hasattr(cell, "b_hn"):
        layer["b_hn"] = cell.b_hn
    return layer


class _RNNParams(cells.RNNCell):
    def __call__(self):
        return _hand_over(self)


class _GRUParams(cells.GRUCell):
    def __call__(self):
        return _hand_over(self)


class _LSTMParams(cells.LSTMCell):
    def __call__(self):
        return _hand_over(self)


_PARAM_HOLDERS = {"rnn": _RNNParams, "gru": _GRUParams, "lstm": _LSTMParams}


def declare_layers(cfg):
    """Per-layer parameter dicts in the scratch layout; call inside a compact method."""
    layers = []
    for index in range(cfg.num_layers):
        extra = ({"activation": cfg.activation} if cfg.cell == "rnn" else
                 {"variant": cfg.gru_variant} if cfg.cell == "gru" else {})
        holder = _PARAM_HOLDERS[cfg.cell](
            in_features=cfg.vocab_size if index == 0 else cfg.num_hiddens,
            hidden=cfg.num_hiddens, token_inputs=index == 0, compute_dtype=cfg.dtype,
            name=f"layer_{index}", **extra)
        layers.append(holder())
    return layers
