"""Training-step speed of deeprnn's implementations against PyTorch, in one run.

    python -m deeprnn.bench --configs=d2l,mid,big,depth,seeds [--impls=fused,cudnn,scratch,
        flax,torch-d2l-loop,torch-tight,matmul-floor] [--json=FILE] [--dtype=float32|bfloat16]
        [--precision=highest|tf32|default] [--profile=DIR] [--repeats=N]
    python -m deeprnn.bench --e2e=PATH/time_machine.txt     (the book's recipe end to end)

Prints a table and writes the rows as JSON (after every row, so a run cut short keeps what it
measured). What a row times and how: deeprnn.bench.rows (seed_rows for the `seeds` config);
--profile: deeprnn.bench.profile. The header and every row say the matmul precision each side
ran (PRECISION below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys

import jax
import numpy as np
from absl import flags

from deeprnn.bench import end_to_end, profile, seed_rows
from deeprnn.bench.rows import (
    CONFIGS,
    IMPLS,
    VARIANT_MODES,
    device_name,
    format_loss,
    format_table,
    machine_busy,
    model_config,
    prepare_row,
    random_stream,
    time_rows,
)
from deeprnn.config import CHOICES
from deeprnn.errors import EXIT_IO, UsageError, parse_argv
from deeprnn.model.build import init_params
from deeprnn.run.outputs import check_output_file, check_output_folder
from deeprnn.run.process import enable_compilation_cache, keep_freed_host_memory

PROGRAM = "deeprnn.bench"
# --precision: (JAX's jax_default_matmul_precision, torch's (matmul, cuDNN) allow_tf32, or None
# to leave torch's defaults alone). On a CPU every float32 matmul is full float32.
PRECISION = {"highest": ("highest", (False, False)),
             "tf32": ("tensorfloat32", (True, True)),
             "default": (None, None)}


def define_flags(values: flags.FlagValues) -> None:
    fv = {"flag_values": values}
    flags.DEFINE_list("configs", ["d2l"], f"Shapes to time: {', '.join(CONFIGS)}.", **fv)
    flags.DEFINE_list("impls", list(IMPLS), f"Rows: {', '.join(IMPLS)}.", **fv)
    flags.DEFINE_string("json", None, "Write the rows here (a JSON list).", **fv)
    flags.DEFINE_enum("dtype", "float32", list(CHOICES["compute_dtype"]),
                      "Compute dtype of the matmuls (PyTorch: autocast for bfloat16).", **fv)
    flags.DEFINE_enum("precision", "highest", list(PRECISION),
                      "float32 matmuls of both sides: highest (full float32, TF32 off), tf32 "
                      "(TF32 on GPUs that have it) or default (each library's default, what a "
                      "user gets: XLA:GPU and cuDNN under PyTorch use TF32, PyTorch's own "
                      "matmuls do not).", **fv)
    flags.DEFINE_string("profile", None, "Also write, for every row, a profiler trace of one "
                        "more repeat under DIR/<config>/<implementation>/ and print the table "
                        "of its top device ops (deeprnn.bench.profile).", **fv)
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
    precision: str
    profile: str | None
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
    if not values.e2e and not (values.configs and values.impls):
        raise UsageError("--configs and --impls must each name at least one; see --help")
    for name in ("repeats", "steps", "steps_per_call", "e2e_epochs"):
        if values[name].value < 1:
            raise UsageError(f"--{name} must be at least 1, got {values[name].value}")
    if values.torch_threads < 0:
        raise UsageError(f"--torch_threads must be 0 (torch's default) or more, got "
                         f"{values.torch_threads}")
    if values.steps % values.steps_per_call:
        raise UsageError(f"--steps={values.steps} must be a multiple of --steps_per_call="
                         f"{values.steps_per_call}")
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


def check_outputs(json_path: str | None, profile_dir: str | None) -> None:
    """Before anything is timed: a --json or --profile the run could not write to would
    otherwise fail after the first row (or, with --e2e, after three whole trainings)."""
    if json_path:
        check_output_file(json_path, "json")
    if profile_dir:
        check_output_folder(profile_dir, "profile")


def _finite_or_none(value):
    """JSON has no NaN or Infinity (json.dump would write them anyway): a value that did not
    come out finite, e.g. a side's perplexity, is written as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _write_json(path, rows) -> None:
    """After every row, so that a run cut short keeps what it measured; written to a temporary
    file and renamed, so a run killed mid-write leaves the previous file whole. An empty list
    is never written: it would replace an earlier run's rows with nothing."""
    if path and rows:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as evaluate does
        partial = f"{path}.partial"
        with open(partial, "w") as f:
            json.dump(_finite_or_none(rows), f, indent=1, allow_nan=False)
        os.replace(partial, path)


def main(argv) -> list[dict]:
    """Runs the benchmark for `python -m deeprnn.bench ARGV`; returns the rows."""
    options = parse_options(argv)
    check_outputs(options.json, options.profile)
    # Every row of this process, torch's included, under the same allocator setting (the --e2e
    # processes set it themselves).
    heap_pad = keep_freed_host_memory()
    if options.e2e:
        rows = end_to_end.run_end_to_end(
            options.e2e, epochs=options.e2e_epochs, flagfile=options.e2e_flagfile,
            torch_threads=options.torch_threads,
            on_row=lambda rows: _write_json(options.json, rows))
        print(end_to_end.format_table(rows))
        _check_some_rows(rows)
        return rows
    if not options.no_cache:
        enable_compilation_cache()
    platform = jax.devices()[0].platform
    impls = _usable_impls(options, platform)
    if not impls and not all(shape.seeds for config in options.configs
                             for shape in CONFIGS[config]):
        raise UsageError(f"none of --impls={','.join(options.impls)} runs here (see the notes "
                         f"above); add one that does, e.g. fused")
    precision = {"deeprnn": jax_precision(options, platform)}
    if any(i.startswith("torch") for i in impls):
        from deeprnn.bench import torch_peers  # deferred: torch is optional

        precision["torch"] = ("autocast bf16" if options.dtype == "bfloat16"
                              else torch_peers.precision_label())
    sides = "; ".join(f"{side} {label}" for side, label in precision.items())
    print(f"device: {device_name()}  jax {jax.__version__}  dtype {options.dtype}  "
          f"matmul precision (--precision={options.precision}): {sides}  "
          f"load {os.getloadavg()[0]:.1f}  host heap pad {'on' if heap_pad else 'off'}",
          flush=True)
    rows = []
    jax_setting, _ = PRECISION[options.precision]
    # A context, not jax.config.update: the rows compile inside it, and a caller in the same
    # process (the tests) keeps its own setting.
    with (jax.default_matmul_precision(jax_setting) if jax_setting
          else contextlib.nullcontext()):
        for config in options.configs:
            for shape in CONFIGS[config]:
                shape = dataclasses.replace(shape, cell=options.cell)
                rows += _time_shape(shape, impls, options, precision, rows)
                _write_json(options.json, rows)
    print(format_table(rows))
    _check_some_rows(rows)
    return rows


def _check_some_rows(rows: list[dict]) -> None:
    """Every row failed (each said why above): one line and exit status 1, the status of a
    run that could not do its work (a UsageError's 2 is for the flags)."""
    if not rows:
        print("error: no row was timed (each one's reason is above); --json, if given, was "
              "left as it was", file=sys.stderr)
        sys.exit(EXIT_IO)


def jax_precision(options: BenchOptions, platform: str) -> str:
    """What deeprnn's float32 matmuls run as under --precision, on this platform."""
    if options.dtype == "bfloat16":
        return "bf16 (f32 acc)"
    if platform == "cpu" or options.precision == "highest":
        return "float32"
    if platform == "tpu" and options.precision == "default":
        return "bf16 passes (XLA:TPU default)"
    return "tf32" if options.precision == "tf32" else "tf32 (XLA default)"


def _usable_impls(options: BenchOptions, platform: str) -> list[str]:
    """The rows asked for; torch rows only where torch imports (set up for timing), cudnn
    only on a GPU (jax.experimental.rnn lowers nowhere else) and in float32."""
    impls = list(options.impls)
    if "cudnn" in impls and (platform != "gpu" or options.dtype != "float32"):
        print(f"note: skipping the cudnn row: cuDNN's LSTM binding runs on CUDA GPUs in float32 "
              f"only (this is {platform}, {options.dtype})", file=sys.stderr)
        impls.remove("cudnn")
    if any(i.startswith("torch") for i in impls):
        if torch_available():
            from deeprnn.bench import torch_peers  # deferred: torch is optional

            torch_peers.set_precision(PRECISION[options.precision][1])
            torch_peers.set_threads(options.torch_threads)
        else:
            print("note: torch is not importable; skipping the torch rows "
                  "(pip install '.[bench]')", file=sys.stderr)
            impls = [i for i in impls if not i.startswith("torch")]
    return impls


def _todo(shape, impls, options: BenchOptions):
    """(row name, prepare() -> (facts, time_repeat)) for every row of one shape."""
    base = init_params(model_config(shape, "scratch", "float32"), jax.random.PRNGKey(0))
    base = jax.tree.map(np.asarray, base)
    stream, starts = random_stream(shape, 20)
    if shape.seeds:
        return [(name, functools.partial(seed_rows.prepare_seeds, count, mode, shape, base,
                                         stream, starts, options))
                for name, count, mode in seed_rows.seed_row_names(shape)]
    todo = [(impl, functools.partial(prepare_row, impl, shape, base, stream, starts, options))
            for impl in impls]
    for s, u, mode in options.variants:
        name = f"fused({s},u{u}{'' if mode == 'hand' else ',' + mode})"
        todo.append((name, functools.partial(prepare_row, "fused", shape, base, stream, starts,
                                             options, (s, u, mode))))
    return todo


def _time_shape(shape, impls, options: BenchOptions, precision: dict[str, str],
                earlier_rows: list[dict]) -> list[dict]:
    """Every row of one shape, from the same initial parameters and batches."""
    prepared = {}
    for name, prepare in _todo(shape, impls, options):
        try:
            prepared[name] = prepare()
        except Exception as err:  # one failing row must not lose the others
            print(f"{shape.name} {name}: failed: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
    loads = [os.getloadavg()[0]]
    timed = time_rows(prepared, options.repeats, shape.name)
    loads.append(os.getloadavg()[0])
    busy = machine_busy(loads, os.cpu_count() or 1)
    rows = []
    for impl, timing in timed.items():
        facts, ms = prepared[impl][0], timing["ms_per_step"]
        tokens = facts.pop("tokens_per_step", shape.batch * shape.steps)
        side = "torch" if impl.startswith("torch") else "deeprnn"
        row = {"implementation": impl, "config": shape.name, **timing, **facts,
               "load": loads, "busy_machine": busy,
               "tokens_per_sec": tokens / (ms / 1e3), "dtype": options.dtype,
               "matmul_precision": precision[side], "precision": options.precision,
               "steps_per_call": facts.get("steps_per_call", 1),
               "shape": dataclasses.asdict(shape)}
        rows.append(row)
        print(f"  {shape.name} {impl}: {ms:.2f} ms/step, loss@k {format_loss(row)}", flush=True)
        _write_json(options.json, earlier_rows + rows)
    _check_same_work(rows, options)
    base_row = next((r for r in rows if r["implementation"] == "torch-d2l-loop"), None)
    for row in rows:
        row["ratio_vs_torch_d2l_loop"] = (None if base_row is None else
                                          row["tokens_per_sec"] / base_row["tokens_per_sec"])
    if shape.seeds:
        seed_rows.one_seed_ratios(rows)
    if options.profile:
        for row in rows:
            _profile(row, prepared[row["implementation"]][1], options)
            _write_json(options.json, earlier_rows + rows)
    return rows


def _check_same_work(rows: list[dict], options: BenchOptions) -> None:
    """A warning for a row whose loss after k steps is not the first row's: rows start from
    the same parameters on the same batches, so a difference means one computes something
    else (on a GPU, the check that cuDNN's packed layout is the one cudnn_lstm.py writes)."""
    losses = [r for r in rows if r["loss_after_k"] is not None]
    # Full float32 agrees to ~1e-6; TF32 and bfloat16 round differently on each side.
    tolerance = 1e-3 if options.dtype == "float32" and options.precision == "highest" else 2e-2
    for row in losses[1:]:
        first = losses[0]
        gap = abs(row["loss_after_k"] - first["loss_after_k"])
        if gap > tolerance * abs(first["loss_after_k"]):
            print(f"warning: {row['config']} {row['implementation']}: loss after k steps "
                  f"{row['loss_after_k']:.5f}, {first['implementation']} "
                  f"{first['loss_after_k']:.5f}: the rows should do the same work",
                  file=sys.stderr, flush=True)


def _profile(row: dict, time_repeat, options: BenchOptions) -> None:
    """row["profile"]: one more repeat under the profiler, its trace and top-ops table."""
    directory = profile.row_directory(options.profile, row["config"], row["implementation"])
    try:
        row["profile"] = profile.profile_row(time_repeat, directory, options.steps,
                                             row["implementation"].startswith("torch"),
                                             getattr(time_repeat, "compiled_hlo", None))
    except Exception as err:  # a profile that fails must not lose the timed rows
        print(f"{row['config']} {row['implementation']}: profile failed: "
              f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return
    print(profile.format_ops(f"{row['config']} {row['implementation']}", row["profile"]),
          flush=True)
