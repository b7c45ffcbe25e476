"""The rows of the step benchmark: the shapes, and one timed training step per implementation.

A step is the book's: cross-entropy loss, gradient, clipping at global norm 1, SGD, a fresh zero
state per batch (d2l's random sampler), on random tokens (no corpus needed: the benchmark imports
neither tensorflow_datasets nor tensorboardX, which the GPU machines lack). Every row starts from
the same initial parameters and sees the same batches; `loss_after_k` is each row's loss at step
k, so equal losses show the rows do the same work. `matmul-floor` is a reference, not a
peer: the step's matmuls alone as XLA runs them on the device (floor.py).
Compile / warm-up time is excluded from ms_per_step and reported; ms_per_step is the median
over repeats (taken round the rows in turn, so that load changes hit every row alike), clocks
read after block_until_ready / torch.cuda.synchronize. `fused` runs --steps_per_call steps per
jitted call (deeprnn.training.device_batches, batches resident on the device) with deeprnn's
own LSTM layer (--lstm_kernel=fused); `cudnn` is the same call with cuDNN's LSTM
(--lstm_kernel=cudnn, GPUs only); scratch and flax run one jitted step per call. The `seeds`
config's rows are in seed_rows.py.
compile_s: JAX rows, lowering + compiling the call (near zero on a warm persistent cache: pass
--no_cache for a cold number); torch rows, the first k steps (cuDNN plans, allocator warm-up).
peak_mem_bytes: JAX rows, XLA's buffer total of the compiled call (arguments + outputs +
temporaries); torch rows, torch.cuda.max_memory_allocated over the warm-up less what was
allocated before the row was built (none on a CPU).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn.bench import floor
from deeprnn.model.build import build_model
from deeprnn.model.config import ModelConfig
from deeprnn.model.convert import scratch_to_flax
from deeprnn.model.fused import FusedDeepRNN, default_unroll
from deeprnn.model.stack import init_carry
from deeprnn.training.device_batches import make_resident_multi_step
from deeprnn.training.optimizer import make_optimizer
from deeprnn.training.train_step import TrainState


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    batch: int
    steps: int
    cell: str = "lstm"
    seeds: tuple[int, ...] = ()  # a `seeds` config: K seeds per row (seed_rows.py)


CONFIGS = {
    "d2l": [Shape("d2l", 28, 256, 2, 32, 35)],
    "mid": [Shape("mid", 96, 512, 3, 128, 64)],
    "big": [Shape("big", 256, 1024, 4, 256, 128)],
    "depth": [Shape(f"depth{n}", 28, 256, n, 32, 35) for n in (1, 2, 4, 8)],
    "seeds": [Shape("seeds", 28, 256, 2, 32, 35, seeds=(1, 4, 16))],  # the d2l shape
    "tiny": [Shape("tiny", 11, 16, 2, 4, 6)],  # for tests
    "tiny-seeds": [Shape("tiny-seeds", 11, 16, 2, 4, 6, seeds=(1, 3))],  # for tests
}
IMPLS = ("fused", "cudnn", "scratch", "flax", "torch-d2l-loop", "torch-tight", "matmul-floor")
VARIANT_MODES = ("hand", "autodiff", "generic", "graph")
# The `graph` variant: XLA:GPU records the whole compiled call, its while loops included (CUDA
# graph conditional nodes), as command buffers replayed from the device, instead of launching
# each loop iteration's kernels from the host. A d2l-shape step is 140 dependent small steps
# (2 layers x 35 steps, forward and backward), about 12 us each at the H200's 1.66 ms/step,
# which is launch latency more than work. XLA checks these names on every backend (a typo is
# an error on the CPU too) and ignores them off the GPU. Not measured on a GPU yet.
GPU_GRAPH_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE",
    "xla_gpu_graph_min_graph_size": 1,
}
LR, CLIP = 2.0, 1.0  # the book's deep-RNN recipe


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return dev.device_kind


def random_stream(shape: Shape, count: int, seed: int = 0):
    """A random token stream holding `count` batches of disjoint windows, and their starts
    [count, B]; targets are the inputs shifted by one token, as in training."""
    stream = np.random.default_rng(seed).integers(
        0, shape.vocab, count * shape.batch * shape.steps + 1, dtype=np.int32)
    starts = (np.arange(count * shape.batch, dtype=np.int32) * shape.steps).reshape(
        count, shape.batch)
    return stream, starts


def host_batches(stream, starts, num_steps):
    """The same windows cut on the host: xs, ys int32 [count, B, T] (for the torch rows)."""
    window = stream[starts[..., None] + np.arange(num_steps + 1)]
    return window[..., :-1], window[..., 1:]


def model_config(shape: Shape, impl: str, dtype: str, lstm_kernel: str = "fused"
                 ) -> ModelConfig:
    """The row's model; fused rows name their LSTM kernel (never auto: a row times one)."""
    return ModelConfig(vocab_size=shape.vocab, num_hiddens=shape.hidden,
                       num_layers=shape.layers, cell=shape.cell, impl=impl,
                       compute_dtype=dtype,
                       lstm_kernel=lstm_kernel if impl == "fused" else "auto")


def compile_call(call, args, compiler_options=None):
    """(compiled, compile_s, peak_mem_bytes) of a jitted call on these arguments."""
    start = time.perf_counter()
    compiled = call.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem = None if memory is None else int(memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes
                                         + memory.temp_size_in_bytes
                                         - memory.alias_size_in_bytes)
    return compiled, compile_s, mem


def prepare_jax(impl: str, shape: Shape, base_params, stream, starts, args, *,
                schedule="auto", unroll=None, hand_vjp=True, lstm_layer=True,
                compiler_options=None, lstm_kernel="fused"):
    """One deeprnn row, compiled and warmed up: (facts, time_repeat). `fused` runs through
    device_batches (steps_per_call per call), the others one jitted step per call. The first
    k = steps_per_call steps give loss_after_k; time_repeat() runs args.steps more and returns
    seconds per step."""
    cfg = model_config(shape, impl, args.dtype, lstm_kernel)
    if impl == "fused":
        model = FusedDeepRNN(cfg, schedule=schedule, unroll=unroll, hand_vjp=hand_vjp,
                             lstm_layer=lstm_layer)
        spc = args.steps_per_call
    else:
        model, spc = build_model(cfg), 1
    params = scratch_to_flax(base_params, cfg) if impl == "flax" else base_params
    tx = make_optimizer("sgd", LR, CLIP)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    # Fresh buffers per leaf: init_carry shares one zeros array between c and h, and the
    # call donates its carry.
    carry = jax.tree.map(jnp.zeros_like, init_carry(cfg, shape.batch))
    resets = jnp.ones((spc,), bool)
    ids = jnp.asarray(stream)  # resident on the device; each call gets window starts only
    call = make_resident_multi_step(model.apply, tx, shape.steps)
    compiled, compile_s, mem = compile_call(
        call, (state, ids, jnp.asarray(starts[:spc]), carry, resets), compiler_options)
    k, losses, calls = args.steps_per_call, None, 0

    def run_calls(count):
        nonlocal state, carry, calls, losses
        for _ in range(count):
            first = (calls * spc) % len(starts)
            batch_starts = jnp.asarray(np.take(starts, range(first, first + spc), axis=0,
                                               mode="wrap"))
            state, carry, metrics = compiled(state, ids, batch_starts, carry, resets)
            calls += 1
            losses = metrics
        jax.block_until_ready(state)

    run_calls(k // spc)
    loss_k = float(losses["loss_sum"][-1] / losses["tokens"][-1])

    def time_repeat() -> float:
        start = time.perf_counter()
        run_calls(args.steps // spc)
        return (time.perf_counter() - start) / args.steps

    time_repeat.compiled_hlo = compiled.as_text  # for --profile's table (describe_ops)

    return {"compile_s": compile_s, "peak_mem_bytes": mem, "loss_after_k": loss_k,
            "steps_per_call": spc, "device": device_name()}, time_repeat


def prepare_row(impl: str, shape: Shape, base_params, stream, starts, args, variant=None):
    if impl == "matmul-floor":
        # The fused rows' unroll (the same number of steps per loop trip), for a like floor.
        unroll = default_unroll("layerwise", args.dtype, shape.steps)
        return floor.prepare_floor(shape, args.dtype, args.steps, unroll, device_name())
    if impl.startswith("torch"):
        from deeprnn.bench import torch_peers  # deferred: torch is optional (the [bench] extra)

        xs, ys = host_batches(stream, starts, shape.steps)
        return torch_peers.prepare_torch(impl.removeprefix("torch-"), shape, base_params, xs,
                                         ys, dtype=args.dtype, lr=LR, clip=CLIP,
                                         k=args.steps_per_call, steps=args.steps)
    if impl == "cudnn":
        return prepare_jax("fused", shape, base_params, stream, starts, args,
                           lstm_kernel="cudnn")
    if variant is not None:
        return prepare_jax("fused", shape, base_params, stream, starts, args,
                           schedule=variant[0], unroll=variant[1],
                           hand_vjp=variant[2] != "autodiff", lstm_layer=variant[2] != "generic",
                           compiler_options=GPU_GRAPH_OPTIONS if variant[2] == "graph" else None)
    return prepare_jax(impl, shape, base_params, stream, starts, args)


# A row whose repeats' interquartile range is more than this share of their median is marked:
# its repeats fall in two groups or wander, so its median is not a reliable time. The
# interquartile range leaves one or two slow repeats (another job's burst) out, which the
# median does too; on this project's shared 2-core VM a quiet row's was 1-6% and a disturbed
# one's 18-28% (`--configs=d2l --repeats=9`, both dtypes, 30 November 2026).
WIDE_SPREAD = 0.1


def time_rows(prepared: dict, repeats: int, label: str) -> dict[str, dict]:
    """{row: {ms_per_step (the median), ms_repeats, spread, wide_spread}} of each prepared row;
    `spread` is the repeats' interquartile range over their median. The repeats go round the
    rows in turn, so a change in the machine's load (other jobs, clocks) falls on every row
    alike, and the ratios between rows stay honest on a shared machine. A row that fails is
    dropped."""
    times = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (_, time_repeat) in list(prepared.items()):
            try:
                times[name].append(time_repeat())
            except Exception as err:  # one failing row must not lose the others
                print(f"{label} {name}: failed: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
                del prepared[name]
    out = {}
    for name in prepared:
        ms = [1e3 * t for t in times[name]]
        median = float(np.median(ms))
        low, high = np.percentile(ms, [25, 75])
        spread = float(high - low) / median if median > 0 else 0.0
        out[name] = {"ms_per_step": median, "ms_repeats": ms, "spread": spread,
                     "wide_spread": spread > WIDE_SPREAD}
    return out


def machine_busy(loads: list[float], cores: int) -> bool:
    """The machine ran other work while the rows were timed: its load average went above
    its core count (the benchmark alone keeps about all cores busy)."""
    return max(loads) > cores


def format_table(rows) -> str:
    """The rows; `ratio` is tokens/s against torch-d2l-loop, or for a `seeds` config against
    its 1-seed row."""
    head = (f"{'config':10} {'implementation':30} {'dtype':8} {'precision':18} {'ms/step':>8} "
            f"{'spread':>7} {'tokens/s':>10} {'ratio':>7} {'compile_s':>9} {'peak MiB':>8} "
            f"{'loss@k':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.get("ratio_vs_one_seed", r["ratio_vs_torch_d2l_loop"])
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        spread = "-" if "spread" not in r else (
            f"{100 * r['spread']:.0f}%{'!' if r.get('wide_spread') else ''}")
        lines.append(
            f"{r['config']:10} {r['implementation']:30} {r['dtype']:8} "
            f"{r['matmul_precision']:18} {r['ms_per_step']:8.2f} {spread:>7} "
            f"{r['tokens_per_sec']:10.0f} {ratio:>7} {r['compile_s']:9.1f} {mem:>8} "
            f"{format_loss(r):>8}")
    lines.append("ratio: tokens/s against torch-d2l-loop (a seeds config: against its 1-seed "
                 "row, aggregate over the seeds); spread: interquartile range / median of the "
                 "repeats")
    if any(r.get("wide_spread") for r in rows):
        lines.append(f"!: repeats spread over more than {WIDE_SPREAD:.0%} of the median: that "
                     "row's time is not reliable")
    busy = sorted({r["config"] for r in rows if r.get("busy_machine")})
    if busy:
        loads = max(max(r["load"]) for r in rows if r.get("busy_machine"))
        lines.append(f"BUSY MACHINE while timing {', '.join(busy)}: load average up to "
                     f"{loads:.1f} on {os.cpu_count()} cores, so other work shared them; "
                     "those times and ratios are noise, measure again on a quiet machine")
    return "\n".join(lines)


def format_loss(row) -> str:
    return "-" if row["loss_after_k"] is None else f"{row['loss_after_k']:.4f}"
