"""Training-step speed of deeprnn's implementations against PyTorch, in one run.

    python -m deeprnn.bench --configs=d2l,mid,big,depth [--impls=fused,scratch,flax,
        torch-d2l-loop,torch-tight] [--json=FILE] [--dtype=float32|bfloat16] [--repeats=N]
    python -m deeprnn.bench --e2e=PATH/time_machine.txt     (the book's recipe end to end)

Prints a table and writes the rows as JSON (after every row, so a run cut short keeps what it
measured). What a row times and how: deeprnn.bench.rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from absl import flags

from deeprnn.bench import end_to_end
from deeprnn.bench.rows import (
    CONFIGS,
    IMPLS,
    VARIANT_MODES,
    device_name,
    format_loss,
    format_table,
    model_config,
    prepare_row,
    random_stream,
    time_rows,
)
from deeprnn.config import CHOICES
from deeprnn.errors import UsageError, parse_argv
from deeprnn.model.build import init_params
from deeprnn.run.process import enable_compilation_cache, keep_freed_host_memory

PROGRAM = "deeprnn.bench"


def define_flags(values: flags.FlagValues) -> None:
    fv = {"flag_values": values}
    flags.DEFINE_list("configs", ["d2l"], f"Shapes to time: {', '.join(CONFIGS)}.", **fv)
    flags.DEFINE_list("impls", list(IMPLS), f"Rows: {', '.join(IMPLS)}.", **fv)
    flags.DEFINE_string("json", None, "Write the rows here (a JSON list).", **fv)
    flags.DEFINE_enum("dtype", "float32", list(CHOICES["compute_dtype"]),
                      "Compute dtype of the matmuls (PyTorch: autocast for bfloat16).", **fv)
    flags.DEFINE_enum("matmul_precision", "highest", ["highest", "tf32"],
                      "float32 matmuls: full precision, or TF32 on GPUs that have it.", **fv)
    flags.DEFINE_integer("repeats", 5, "Timed repeats of each row, taken round the rows.", **fv)
    flags.DEFINE_integer("steps", 20, "Timed steps per repeat.", **fv)
    flags.DEFINE_integer("steps_per_call", 10, "fused: optimizer steps per jitted call.", **fv)
    flags.DEFINE_enum("cell", "lstm", list(CHOICES["cell"]), "Recurrent cell of every row.", **fv)
    flags.DEFINE_list(
        "fused_variants", [], "Extra fused rows, each schedule:unroll[:autodiff|:generic|"
        ":graph] (autodiff: JAX's own gradient of the scan; generic: LSTM layers through the "
        "general recurrence instead of fused_lstm.py; graph: the call recorded as CUDA graphs, "
        "loops included, on a GPU), e.g. wavefront:1,layerwise:8:generic,layerwise:1:graph.",
        **fv)
    flags.DEFINE_boolean("no_cache", False, "Skip JAX's persistent compilation cache (a cold "
                         "compile_s).", **fv)
    flags.DEFINE_string("e2e", None, "Instead of the step table: the book's recipe end to end, "
                        "deeprnn (cold and warm compile cache) against PyTorch's d2l train_ch8, "
                        "each a timed process; the path of time_machine.txt.", **fv)
    flags.DEFINE_integer("e2e_epochs", 500, "--e2e: epochs of the recipe.", **fv)
    flags.DEFINE_string("e2e_flagfile", end_to_end.RECIPE, "--e2e: deeprnn's flagfile.", **fv)
    flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads on a CPU (0: torch's "
                         "default). On a loaded CPU torch's OpenMP threads can spin against "
                         "other processes; 1 avoids that.", **fv)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """The benchmark's flags, checked; `variants` are the parsed --fused_variants."""
    configs: list[str]
    impls: list[str]
    json: str | None
    dtype: str
    matmul_precision: str
    repeats: int
    steps: int
    steps_per_call: int
    cell: str
    variants: list[tuple[str, int, str]]
    no_cache: bool
    e2e: str | None
    e2e_epochs: int
    e2e_flagfile: str
    torch_threads: int


def parse_options(argv) -> BenchOptions:
    values, positional = parse_argv(define_flags, argv, PROGRAM)
    if positional:
        raise UsageError(f"unexpected arguments {positional}; every setting is a --flag")
    for name in values.configs:
        if name not in CONFIGS:
            raise UsageError(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}")
    for name in values.impls:
        if name not in IMPLS:
            raise UsageError(f"--impls: unknown {name!r}; choose from {', '.join(IMPLS)}")
        if values.impls.count(name) > 1:
            raise UsageError(f"--impls names {name} twice: each row is timed once")
    for name in ("repeats", "steps", "steps_per_call"):
        if values[name].value < 1:
            raise UsageError(f"--{name} must be at least 1, got {values[name].value}")
    if values.steps % values.steps_per_call:
        raise UsageError(f"--steps={values.steps} must be a multiple of --steps_per_call")
    fields = {f.name for f in dataclasses.fields(BenchOptions)} - {"variants"}
    return BenchOptions(**{name: values[name].value for name in fields},
                        variants=_parse_variants(values.fused_variants))


def _parse_variants(specs: list[str]) -> list[tuple[str, int, str]]:
    variants = []
    for spec in specs:
        parts = spec.split(":")
        mode = parts[2] if len(parts) == 3 else "hand"
        if (len(parts) not in (2, 3) or parts[0] not in ("wavefront", "layerwise")
                or not parts[1].isdigit() or int(parts[1]) < 1 or mode not in VARIANT_MODES):
            raise UsageError(f"--fused_variants: {spec!r} is not schedule:unroll[:autodiff|"
                             ":generic|:graph], e.g. layerwise:8 or wavefront:1:autodiff")
        if (parts[0], int(parts[1]), mode) in variants:
            raise UsageError(f"--fused_variants names {spec} twice: each row is timed once")
        variants.append((parts[0], int(parts[1]), mode))
    return variants


def torch_available() -> bool:
    try:
        import torch  # noqa: F401  (deferred: only to learn whether it is installed)
    except ImportError:
        return False
    return True


def _write_json(path, rows) -> None:
    """After every row, so that a run cut short keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv) -> list[dict]:
    """Runs the benchmark for `python -m deeprnn.bench ARGV`; returns the rows."""
    options = parse_options(argv)
    # Every row of this process, torch's included, under the same allocator setting (the --e2e
    # processes set it themselves).
    heap_pad = keep_freed_host_memory()
    if options.e2e:
        rows = end_to_end.run_end_to_end(
            options.e2e, epochs=options.e2e_epochs, flagfile=options.e2e_flagfile,
            torch_threads=options.torch_threads,
            on_row=lambda rows: _write_json(options.json, rows))
        print(end_to_end.format_table(rows))
        return rows
    if not options.no_cache:
        enable_compilation_cache()
    jax.config.update("jax_default_matmul_precision",
                      "highest" if options.matmul_precision == "highest" else "tensorfloat32")
    on_gpu = jax.devices()[0].platform == "gpu"
    precision = "float32" if options.matmul_precision == "highest" or not on_gpu else "tf32"
    if options.dtype == "bfloat16":
        precision = "bf16 (f32 acc)"
    impls = _usable_impls(options, on_gpu)
    print(f"device: {device_name()}  jax {jax.__version__}  dtype {options.dtype}  "
          f"matmul precision {precision}  load {os.getloadavg()[0]:.1f}  "
          f"host heap pad {'on' if heap_pad else 'off'}", flush=True)
    rows = []
    for config in options.configs:
        for shape in CONFIGS[config]:
            shape = dataclasses.replace(shape, cell=options.cell)
            rows += _time_shape(shape, impls, options, precision, on_gpu, rows)
            _write_json(options.json, rows)
    print(format_table(rows))
    return rows


def _usable_impls(options: BenchOptions, on_gpu: bool) -> list[str]:
    """The rows asked for; the torch rows only where torch imports (set up for timing)."""
    impls = list(options.impls)
    if any(i.startswith("torch") for i in impls):
        if torch_available():
            from deeprnn.bench import torch_peers  # deferred: torch is optional

            torch_peers.set_precision(options.matmul_precision if on_gpu else "highest")
            torch_peers.set_threads(options.torch_threads)
        else:
            print("note: torch is not importable; skipping the torch rows "
                  "(pip install '.[bench]')", file=sys.stderr)
            impls = [i for i in impls if not i.startswith("torch")]
    return impls


def _torch_precision(options: BenchOptions, on_gpu: bool) -> str:
    if options.dtype == "bfloat16":
        return "autocast bf16"
    return "tf32" if on_gpu and options.matmul_precision == "tf32" else "float32"


def _time_shape(shape, impls, options: BenchOptions, precision: str, on_gpu: bool,
                earlier_rows: list[dict]) -> list[dict]:
    """Every row of one shape, from the same initial parameters and batches."""
    base = init_params(model_config(shape, "scratch", "float32"), jax.random.PRNGKey(0))
    base = jax.tree.map(np.asarray, base)
    stream, starts = random_stream(shape, 20)
    todo = [(impl, None) for impl in impls] + [
        (f"fused({s},u{u}{'' if mode == 'hand' else ',' + mode})", (s, u, mode))
        for s, u, mode in options.variants]
    prepared = {}
    for impl, variant in todo:
        try:
            prepared[impl] = prepare_row(impl, shape, base, stream, starts, options, variant)
        except Exception as err:  # one failing row must not lose the others
            print(f"{shape.name} {impl}: failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
    ms_per_step = time_rows(prepared, options.repeats, shape.name)
    rows = []
    for impl, ms in ms_per_step.items():
        facts = prepared[impl][0]
        row = {"implementation": impl, "config": shape.name, "ms_per_step": ms, **facts,
               "tokens_per_sec": shape.batch * shape.steps / (ms / 1e3),
               "dtype": options.dtype,
               "matmul_precision": (_torch_precision(options, on_gpu)
                                    if impl.startswith("torch") else precision),
               "steps_per_call": facts.get("steps_per_call", 1),
               "shape": dataclasses.asdict(shape)}
        rows.append(row)
        print(f"  {shape.name} {impl}: {ms:.2f} ms/step, loss@k {format_loss(row)}", flush=True)
        _write_json(options.json, earlier_rows + rows)
    base_row = next((r for r in rows if r["implementation"] == "torch-d2l-loop"), None)
    for row in rows:
        row["ratio_vs_torch_d2l_loop"] = (None if base_row is None else
                                          row["tokens_per_sec"] / base_row["tokens_per_sec"])
    return rows
