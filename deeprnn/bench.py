"""Training-step speed of deeprnn's implementations against PyTorch, in one run.

    python -m deeprnn.bench --configs=d2l,mid,big,depth [--impls=fused,scratch,flax,
        torch-d2l-loop,torch-tight] [--json=FILE] [--dtype=float32|bfloat16] [--repeats=N]

A step is the book's: cross-entropy loss, gradient, clipping at global norm 1, SGD, a fresh zero
state per batch (d2l's random sampler), on random tokens (no corpus needed: this module imports
neither tensorflow_datasets nor tensorboardX, which the GPU machines lack). Every row starts from
the same initial parameters and sees the same batches; `loss_after_k` is each row's loss at step
k, so equal losses show the rows do the same work. `matmul-floor` is a reference, not a
peer: the step's matmuls alone as XLA runs them on the device (deeprnn.bench_floor).
Compile / warm-up time is excluded from ms_per_step and reported; ms_per_step is the median
over repeats (taken round the rows in turn, so that load changes hit every row alike), clocks
read after block_until_ready / torch.cuda.synchronize. `fused` runs --steps_per_call steps per
jitted call (deeprnn.multistep, batches resident on the device); scratch and flax run one
jitted step per call.
compile_s: JAX rows, lowering + compiling the call (near zero on a warm persistent cache: pass
--no_cache for a cold number); torch rows, the first k steps (cuDNN plans, allocator warm-up).
peak_mem_bytes: JAX rows, XLA's buffer total of the compiled call (arguments + outputs +
temporaries); torch rows, torch.cuda.max_memory_allocated over the warm-up less what was
allocated before the row was built (none on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from deeprnn import bench_e2e, bench_floor, jax_setup, models, multistep, steps
from deeprnn.errors import UsageError, exit_on_usage_error
from deeprnn.fused import FusedDeepRNN, default_unroll


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    batch: int
    steps: int
    cell: str = "lstm"


CONFIGS = {
    "d2l": [Shape("d2l", 28, 256, 2, 32, 35)],
    "mid": [Shape("mid", 96, 512, 3, 128, 64)],
    "big": [Shape("big", 256, 1024, 4, 256, 128)],
    "depth": [Shape(f"depth{n}", 28, 256, n, 32, 35) for n in (1, 2, 4, 8)],
    "tiny": [Shape("tiny", 11, 16, 2, 4, 6)],  # for tests
}
IMPLS = ("fused", "scratch", "flax", "torch-d2l-loop", "torch-tight", "matmul-floor")
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m deeprnn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="d2l", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--json", default=None, help="write the rows here (JSON list)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--matmul_precision", default="highest", choices=("highest", "tf32"),
                   help="float32 matmuls: full precision, or TF32 on GPUs that have it")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--steps_per_call", type=int, default=10, help="fused: steps per jitted call")
    p.add_argument("--cell", default="lstm", choices=("lstm", "gru", "rnn"))
    p.add_argument("--fused_variants", default="",
                   help="extra fused rows, comma list of schedule:unroll[:autodiff|:generic|"
                   ":graph] (autodiff: JAX's own gradient of the scan; generic: LSTM layers "
                   "through the general recurrence instead of deeprnn.fused_lstm; graph: the "
                   "call recorded as CUDA graphs, loops included, on a GPU), e.g. "
                   "wavefront:1,layerwise:8:generic,layerwise:1:graph")
    p.add_argument("--no_cache", action="store_true", help="skip the persistent compile cache")
    p.add_argument("--e2e", default=None, metavar="TIME_MACHINE_TXT",
                   help="instead of the step table: the book's recipe end to end, deeprnn "
                   "(cold and warm compile cache) against PyTorch's d2l train_ch8, each a "
                   "timed process (deeprnn.bench_e2e)")
    p.add_argument("--e2e_epochs", type=int, default=500)
    p.add_argument("--e2e_flagfile", default=bench_e2e.RECIPE)
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch.set_num_threads on a CPU (0: torch's default). On a loaded CPU "
                   "torch's OpenMP threads can spin against other processes; 1 avoids that")
    args = p.parse_args(argv)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise UsageError(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}")
    for name in args.impls.split(","):
        if name not in IMPLS:
            raise UsageError(f"--impls: unknown {name!r}; choose from {', '.join(IMPLS)}")
        if args.impls.split(",").count(name) > 1:
            raise UsageError(f"--impls names {name} twice: each row is timed once")
    if args.steps % args.steps_per_call:
        raise UsageError(f"--steps={args.steps} must be a multiple of --steps_per_call")
    args.variants = []
    for spec in filter(None, args.fused_variants.split(",")):
        parts = spec.split(":")
        mode = parts[2] if len(parts) == 3 else "hand"
        if (len(parts) not in (2, 3) or parts[0] not in ("wavefront", "layerwise")
                or not parts[1].isdigit() or int(parts[1]) < 1
                or mode not in VARIANT_MODES):
            raise UsageError(f"--fused_variants: {spec!r} is not schedule:unroll[:autodiff|"
                             ":generic|:graph], e.g. layerwise:8 or wavefront:1:autodiff")
        if (parts[0], int(parts[1]), mode) in args.variants:
            raise UsageError(f"--fused_variants names {spec} twice: each row is timed once")
        args.variants.append((parts[0], int(parts[1]), mode))
    return args


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


def model_config(shape: Shape, impl: str, dtype: str) -> models.ModelConfig:
    return models.ModelConfig(vocab_size=shape.vocab, num_hiddens=shape.hidden,
                              num_layers=shape.layers, cell=shape.cell, impl=impl,
                              compute_dtype=dtype)


def prepare_jax(impl: str, shape: Shape, base_params, stream, starts, args, *,
                schedule="auto", unroll=None, hand_vjp=True, lstm_layer=True,
                compiler_options=None):
    """One deeprnn row, compiled and warmed up: (facts, time_repeat). `fused` runs through
    multistep (steps_per_call per call), the others one jitted step per call. The first
    k = steps_per_call steps give loss_after_k; time_repeat() runs args.steps more and returns
    seconds per step."""
    cfg = model_config(shape, impl, args.dtype)
    if impl == "fused":
        model = FusedDeepRNN(cfg, schedule=schedule, unroll=unroll, hand_vjp=hand_vjp,
                             lstm_layer=lstm_layer)
        spc = args.steps_per_call
    else:
        model, spc = models.build_model(cfg), 1
    params = base_params
    if impl == "flax":
        from deeprnn.convert import scratch_to_flax

        params = scratch_to_flax(base_params, cfg)
    tx = steps.make_optimizer("sgd", LR, CLIP)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
    # Fresh buffers per leaf: init_carry shares one zeros array between c and h, and the
    # call donates its carry.
    carry = jax.tree.map(jnp.zeros_like, models.init_carry(cfg, shape.batch))
    resets = jnp.ones((spc,), bool)
    ids = jnp.asarray(stream)  # resident on the device; each call gets window starts only
    call = multistep.make_resident_multi_step(model.apply, tx, shape.steps)
    start = time.perf_counter()
    compiled = call.lower(state, ids, jnp.asarray(starts[:spc]), carry, resets).compile(
        compiler_options)
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem = None if memory is None else int(memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes
                                         + memory.temp_size_in_bytes
                                         - memory.alias_size_in_bytes)
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

    return {"compile_s": compile_s, "peak_mem_bytes": mem, "loss_after_k": loss_k,
            "steps_per_call": spc, "device": device_name()}, time_repeat


def prepare_row(impl: str, shape: Shape, base_params, stream, starts, args, variant=None):
    if impl == "matmul-floor":
        return bench_floor.prepare_floor(shape, args.dtype, args.steps,
                                         default_unroll("layerwise"), device_name())
    if impl.startswith("torch"):
        from deeprnn import bench_torch

        xs, ys = host_batches(stream, starts, shape.steps)
        return bench_torch.prepare_torch(impl.removeprefix("torch-"), shape, base_params, xs,
                                         ys, dtype=args.dtype, lr=LR, clip=CLIP,
                                         k=args.steps_per_call, steps=args.steps)
    if variant is not None:
        return prepare_jax("fused", shape, base_params, stream, starts, args,
                           schedule=variant[0], unroll=variant[1],
                           hand_vjp=variant[2] != "autodiff", lstm_layer=variant[2] != "generic",
                           compiler_options=GPU_GRAPH_OPTIONS if variant[2] == "graph" else None)
    return prepare_jax(impl, shape, base_params, stream, starts, args)


def time_rows(prepared: dict, repeats: int, label: str) -> dict[str, float]:
    """Median ms/step of each prepared row. The repeats go round the rows in turn, so a
    change in the machine's load (other jobs, clocks) falls on every row alike, and the
    ratios between rows stay honest on a shared machine. A row that fails is dropped."""
    times = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (_, time_repeat) in list(prepared.items()):
            try:
                times[name].append(time_repeat())
            except Exception as err:  # one failing row must not lose the others
                print(f"{label} {name}: failed: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
                del prepared[name]
    return {name: 1e3 * float(np.median(times[name])) for name in prepared}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(rows) -> str:
    head = (f"{'config':8} {'implementation':30} {'dtype':8} {'precision':14} {'ms/step':>8} "
            f"{'tokens/s':>10} {'vs d2l-loop':>11} {'compile_s':>9} {'peak MiB':>8} "
            f"{'loss@k':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["ratio_vs_torch_d2l_loop"]
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        lines.append(
            f"{r['config']:8} {r['implementation']:30} {r['dtype']:8} {r['matmul_precision']:14} "
            f"{r['ms_per_step']:8.2f} {r['tokens_per_sec']:10.0f} {ratio:>11} "
            f"{r['compile_s']:9.1f} {mem:>8} {_loss(r):>8}")
    return "\n".join(lines)


def _loss(row) -> str:
    return "-" if row["loss_after_k"] is None else f"{row['loss_after_k']:.4f}"


def _set_torch_threads(args) -> None:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)


def _torch_precision(args, on_gpu) -> str:
    if args.dtype == "bfloat16":
        return "autocast bf16"
    return "tf32" if on_gpu and args.matmul_precision == "tf32" else "float32"


def _write_json(path, rows) -> None:
    """After every row, so that a run cut short keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    # Every row of this process, torch's included, under the same allocator setting (the --e2e
    # processes set it themselves).
    heap_pad = jax_setup.keep_freed_host_memory()
    if args.e2e:
        rows = bench_e2e.run_end_to_end(
            args.e2e, epochs=args.e2e_epochs, flagfile=args.e2e_flagfile,
            torch_threads=args.torch_threads, on_row=lambda rows: _write_json(args.json, rows))
        print(bench_e2e.format_table(rows))
        return rows
    if not args.no_cache:
        jax_setup.enable_compilation_cache()
    jax.config.update("jax_default_matmul_precision",
                      "highest" if args.matmul_precision == "highest" else "tensorfloat32")
    on_gpu = jax.devices()[0].platform == "gpu"
    precision = ("float32" if args.matmul_precision == "highest" or not on_gpu else "tf32")
    if args.dtype == "bfloat16":
        precision = "bf16 (f32 acc)"
    impls = args.impls.split(",")
    if any(i.startswith("torch") for i in impls):
        if torch_available():
            from deeprnn import bench_torch

            bench_torch.set_precision(args.matmul_precision if on_gpu else "highest")
            _set_torch_threads(args)
        else:
            print("note: torch is not importable; skipping the torch rows "
                  "(pip install '.[bench]')", file=sys.stderr)
            impls = [i for i in impls if not i.startswith("torch")]
    print(f"device: {device_name()}  jax {jax.__version__}  dtype {args.dtype}  "
          f"matmul precision {precision}  load {os.getloadavg()[0]:.1f}  "
          f"host heap pad {'on' if heap_pad else 'off'}", flush=True)
    rows = []
    for config in args.configs.split(","):
        for shape in CONFIGS[config]:
            shape = dataclasses.replace(shape, cell=args.cell)
            base = models.init_params(model_config(shape, "scratch", "float32"),
                                      jax.random.PRNGKey(0))
            base = jax.tree.map(np.asarray, base)
            stream, starts = random_stream(shape, 20)
            todo = [(impl, None) for impl in impls] + [
                (f"fused({s},u{u}{'' if mode == 'hand' else ',' + mode})", (s, u, mode))
                for s, u, mode in args.variants]
            prepared = {}
            for impl, variant in todo:
                try:
                    prepared[impl] = prepare_row(impl, shape, base, stream, starts, args,
                                                 variant)
                except Exception as err:  # one failing row must not lose the others
                    print(f"{shape.name} {impl}: failed: {type(err).__name__}: {err}",
                          file=sys.stderr, flush=True)
            ms_per_step = time_rows(prepared, args.repeats, shape.name)
            config_rows = []
            for impl, ms in ms_per_step.items():
                result = {"ms_per_step": ms, **prepared[impl][0]}
                tokens = shape.batch * shape.steps
                row = {"implementation": impl, "config": shape.name, **result,
                       "tokens_per_sec": tokens / (result["ms_per_step"] / 1e3),
                       "dtype": args.dtype,
                       "matmul_precision": _torch_precision(args, on_gpu)
                       if impl.startswith("torch") else precision,
                       "steps_per_call": result.get("steps_per_call", 1),
                       "shape": dataclasses.asdict(shape)}
                config_rows.append(row)
                print(f"  {shape.name} {impl}: {row['ms_per_step']:.2f} ms/step, "
                      f"loss@k {_loss(row)}", flush=True)
                _write_json(args.json, rows + config_rows)
            base_row = next((r for r in config_rows if r["implementation"] == "torch-d2l-loop"),
                            None)
            for row in config_rows:
                base_speed = None if base_row is None else base_row["tokens_per_sec"]
                row["ratio_vs_torch_d2l_loop"] = (None if base_speed is None else
                                                  row["tokens_per_sec"] / base_speed)
            rows += config_rows
            _write_json(args.json, rows)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    with exit_on_usage_error():
        main()
