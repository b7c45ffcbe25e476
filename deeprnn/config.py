"""RunConfig, the one table of flag choices, and the checks every run's flags pass once.

The training program's flags are RunConfig's fields, one absl flag each; the other programs
read a run's RunConfig back from its checkpoint. Names follow d2l where d2l has one
(batch_size, num_steps, num_hiddens, num_layers, lr, num_epochs); `num_steps` is always time
steps per batch, as in the book. absl reads flags left to right, so a flag given after
--flagfile overrides the value in the file.

This module is the bottom layer with deeprnn.errors: it imports no other deeprnn module, so
data, model and training code take their choices and checks from here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from absl import flags

from deeprnn.errors import UsageError, parse_argv
from deeprnn.limits import SEED_MAX, UPPER_BOUNDS, check_at_most, check_multihost, check_seed

# Every flag with a fixed set of values, and those values (the first is not always the default).
CHOICES = {
    "preprocess": ("d2l", "d2l_lines", "raw"),
    "sampler": ("random", "sequential"),
    "cell": ("rnn", "gru", "lstm"),
    "activation": ("tanh", "relu"),
    "gru_variant": ("cudnn", "d2l"),
    "impl": ("scratch", "flax", "fused"),
    "lstm_kernel": ("auto", "fused", "cudnn"),
    "compute_dtype": ("float32", "bfloat16"),
    "optimizer": ("sgd", "adam"),
    "lr_schedule": ("constant", "cosine", "warmup_cosine"),
    "nan_policy": ("stop", "skip"),
    "parallel": ("shard_map", "pmap"),
}


def check_choice(name: str, value) -> None:
    """UsageError unless `value` is one of CHOICES[name]."""
    if value not in CHOICES[name]:
        raise UsageError(f"--{name}={value!r} is not one of {', '.join(CHOICES[name])}")


def check_model(*, cell: str, activation: str, gru_variant: str, impl: str, compute_dtype: str,
                num_layers: int, num_hiddens: int, dropout: float, lstm_kernel: str = "auto",
                **_) -> None:
    """The model flags' checks, shared by RunConfig (flags) and ModelConfig (code that builds a
    model directly, as the benchmark does)."""
    for name, value in (("cell", cell), ("activation", activation),
                        ("gru_variant", gru_variant), ("impl", impl),
                        ("compute_dtype", compute_dtype), ("lstm_kernel", lstm_kernel)):
        check_choice(name, value)
    for name, value in (("num_layers", num_layers), ("num_hiddens", num_hiddens)):
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    if cell == "gru" and gru_variant == "d2l" and impl == "flax":
        raise UsageError("--impl=flax has no d2l-variant GRU (Flax's GRUCell is the cudnn one);"
                         " use --impl=scratch or --gru_variant=cudnn")
    if lstm_kernel == "cudnn":
        # jax.experimental.rnn binds cuDNN's LSTM only, in float32 only (its lowering refuses
        # any other dtype), and only the fused implementation takes a layer kernel.
        if cell != "lstm" or impl != "fused":
            raise UsageError(f"--lstm_kernel=cudnn runs LSTM layers of --impl=fused only, not "
                             f"--cell={cell} --impl={impl}; use --lstm_kernel=auto")
        if compute_dtype != "float32":
            raise UsageError(f"--lstm_kernel=cudnn is float32 only (jax.experimental.rnn takes "
                             f"no {compute_dtype}); use --lstm_kernel=auto or "
                             "--compute_dtype=float32")


REMOTE_SCHEMES = {"gs": "gcsfs"}  # scheme -> the package etils.epath reaches it through


def check_reachable(path: str, flag: str) -> None:
    """A local path, or gs:// with gcsfs installed; anything else is one usage error (etils
    would raise a KeyError for an unknown scheme, an ImportError without gcsfs). A leading ~
    is refused: the shell leaves it as it is after `=`, so the run would go to a folder named
    ~ in the current one."""
    if os.fspath(path).startswith("~"):
        raise UsageError(f"--{flag}={path}: the shell does not expand ~ after '='; write "
                         f"--{flag}={os.path.expanduser(os.fspath(path))} (or --{flag} {path})")
    if "://" not in os.fspath(path):
        return
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise UsageError(f"--{flag}={path}: {scheme}:// is not supported; use a local folder "
                         "or gs://BUCKET/PATH")
    if importlib.util.find_spec(REMOTE_SCHEMES[scheme]) is None:
        raise UsageError(f"--{flag}={path} needs {REMOTE_SCHEMES[scheme]} to reach Cloud "
                         "Storage: pip install -e '.[gcs]'")


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' -> (0.9, 0.05, 0.05), for a --split flag."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError as e:
        raise UsageError(f"--split={text!r} is not three comma-separated numbers") from e
    return check_split(parts)


def check_split(split) -> tuple[float, float, float]:
    split = tuple(float(f) for f in split)
    if len(split) != 3 or any(not math.isfinite(f) or f < 0 for f in split):
        raise UsageError(f"split {split} must be three non-negative fractions (train, validation,"
                         " test), e.g. 0.9,0.05,0.05")
    if abs(sum(split) - 1.0) > 1e-6:
        raise UsageError(f"split fractions {split} must add up to 1 (they add up to "
                         f"{sum(split):g}); e.g. 0.9,0.05,0.05 or 1,0,0")
    return split  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # data
    corpus: str = "time_machine"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    preprocess: str = "d2l"
    split: str = "0.9,0.05,0.05"
    max_tokens: int = 0
    sampler: str = "sequential"
    batch_size: int = 32
    num_steps: int = 35
    eval_batch_size: int = 32
    # model
    cell: str = "lstm"
    activation: str = "tanh"
    gru_variant: str = "cudnn"
    num_layers: int = 2
    num_hiddens: int = 256
    dropout: float = 0.0
    residual: bool = False
    layer_norm: bool = False
    impl: str = "fused"
    lstm_kernel: str = "auto"
    compute_dtype: str = "float32"
    # optimisation
    optimizer: str = "sgd"
    lr: float = 2.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float = 1.0
    num_epochs: int = 50
    num_train_steps: int = 0
    seed: int = 0
    num_seeds: int = 1
    steps_per_call: int = 1
    nan_policy: str = "stop"
    # intervals and outputs (in steps)
    log_every: int = 10
    eval_every: int = 0
    sample_every: int = 0
    checkpoint_every: int = 0
    max_to_keep: int = 3
    sample_prefix: str = "time traveller"
    sample_length: int = 50
    profile_steps: str = ""
    tensorboard: bool = True
    # devices and hosts
    parallel: str = "shard_map"
    multihost: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def split_fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)


# Flags whose change makes a checkpoint unusable or the run another one (other parameter shapes,
# other data, data order or regularisation): a resume with different values is refused.
# Intervals, budgets, --lr, --nan_policy and --eval_batch_size may change (the training loop
# warns about the last: validation then reads other streams, see the README).
RESUME_KEYS = ("corpus", "preprocess", "split", "max_tokens", "sampler", "batch_size",
               "num_steps", "cell", "activation", "gru_variant", "num_layers", "num_hiddens",
               "dropout", "residual", "layer_norm", "optimizer", "seed", "num_seeds")

_HELP = {
    "corpus": "Corpus spec: names (time_machine, war_of_the_worlds, frankenstein, "
              "pride_and_prejudice, war_and_peace, tiny_shakespeare; the benchmarks text8 and "
              "enwik8, with their standard 90M/5M/5M split and --preprocess=raw), "
              "gutenberg:<id> or file:<path>, comma-separated to train on several.",
    "data_dir": "Folder of raw <name>.txt files (and text8.zip, enwik8.zip or the unzipped "
                "text8, enwik8) read before any download (read-only; local, or gs:// for the "
                "named texts, e.g. for the workers of a TPU pod slice). Default: "
                "$DEEPRNN_DATA_DIR.",
    "tfds_data_dir": "Local folder where TFDS keeps downloads and prepared datasets (default "
                     "TFDS's); each host of a multi-host run prepares its own copy.",
    "preprocess": "d2l (d2l 1.0: letters only, lowercase, on the whole text), d2l_lines "
                  "(d2l 0.17: the same per line, lines glued) or raw (every character).",
    "split": "Train,validation,test fractions of each document, contiguous; 1,0,0 means no "
             "held-out split (d2l's mode).",
    "max_tokens": "Keep only the first N characters of the corpus (d2l 0.17 uses 10000); 0: all.",
    "sampler": "random (random windows, state reset every batch) or sequential (streams whose "
               "state carries over, d2l's default).",
    "batch_size": "Global batch: parallel sequences per step, split evenly across all devices "
                  "of all hosts, so it must divide by the device count.",
    "num_steps": "Time steps per batch (d2l's num_steps).",
    "eval_batch_size": "Parallel streams for evaluation over a whole held-out split (global, "
                       "like --batch_size: it must divide by the device count).",
    "cell": "Recurrent cell: rnn, gru or lstm.",
    "activation": "Activation of the vanilla rnn cell: tanh or relu.",
    "gru_variant": "cudnn (reset gate after the hidden matmul, as Flax/PyTorch/cuDNN) or d2l "
                   "(the book's: reset gate before the hidden matmul).",
    "num_layers": "Stacked recurrent layers (L).",
    "num_hiddens": "Hidden units per layer.",
    "dropout": "Dropout between layers (and before the output layer) during training.",
    "residual": "Residual connections between recurrent layers (deep stacks).",
    "layer_norm": "Layer normalisation between recurrent layers (deep stacks).",
    "impl": "fused (the fast path, default: measured faster than the others on CPU and GPU), "
            "scratch (the project's cells from the equations; same parameters as fused) or "
            "flax (Flax's own cells).",
    "lstm_kernel": "LSTM layers of --impl=fused: fused (deeprnn's own, fused_lstm.py), cudnn "
                   "(cuDNN through jax.experimental.rnn: CUDA GPUs, float32, one seed) or auto "
                   "(picks per backend and shape from measured results; never cudnn off a "
                   "GPU). Checkpoints are the same for all three, so a run may switch.",
    "compute_dtype": "float32 or bfloat16 compute; parameters stay float32.",
    "optimizer": "sgd (the book's) or adam.",
    "lr": "Learning rate (the book uses 2 with SGD; try 2e-3 with adam).",
    "lr_schedule": "constant, cosine, or warmup_cosine (with --warmup_steps).",
    "warmup_steps": "Warm-up steps for --lr_schedule=warmup_cosine.",
    "clip_norm": "Clip gradients to this global norm before the update (the book uses 1).",
    "num_epochs": "Passes over the training text; ignored when --num_train_steps is set.",
    "num_train_steps": "Total training steps; overrides --num_epochs when > 0.",
    "seed": "Seed of the initial parameters, dropout and data order.",
    "num_seeds": "Train K independently initialised copies (seeds seed..seed+K-1, each with "
                 "its own data order) as one vmapped program on one device; metrics per seed "
                 "(seed_<k>/...), their mean and spread (<tag>_std).",
    "steps_per_call": "Optimizer steps per compiled call (a lax.scan over batches): keeps the "
                      "host out of the loop on fast accelerators. The eval, sample and "
                      "checkpoint intervals must be multiples of it.",
    "nan_policy": "stop: a non-finite loss or gradient stops the run, naming the last good "
                  "checkpoint; skip: skip that update and count it (train/skipped_updates).",
    "log_every": "Write training metrics every N steps.",
    "eval_every": "Evaluate on the validation split every N steps; 0: once per epoch.",
    "sample_every": "Generate a sample from --sample_prefix every N steps; 0: at eval time.",
    "checkpoint_every": "Save a checkpoint every N steps; 0: at eval time and at the end.",
    "max_to_keep": "Newest checkpoints kept in the workdir.",
    "sample_prefix": "Prefix that samples start from.",
    "sample_length": "Characters generated per sample.",
    "profile_steps": "A,B: write a jax.profiler trace of steps A to B into the workdir.",
    "tensorboard": "Write TensorBoard events (needs tensorboardX); --notensorboard keeps only "
                   "metrics.jsonl and summary.json (e.g. on machines without tensorboardX).",
    "parallel": "How the step maps over devices: shard_map (jit over jax.shard_map, fastest) "
                "or pmap; both give the same numbers.",
    "multihost": "Call jax.distributed.initialize() first (Cloud TPU pod slices: arguments "
                 "from the environment; elsewhere set the three flags below).",
    "coordinator_address": "host:port of process 0 for --multihost outside Cloud TPU.",
    "num_processes": "Number of processes for --multihost outside Cloud TPU (0: from the "
                     "environment).",
    "process_id": "This process's index for --multihost outside Cloud TPU (-1: from the "
                  "environment).",
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per RunConfig field, plus --workdir."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard events, "
                        "metrics.jsonl, summary.json; locked while a run uses it. Running the "
                        "same command again resumes (exit status 75 = preempted, rerun).", **fv)
    define = {"bool": flags.DEFINE_boolean, "int": flags.DEFINE_integer,
              "float": flags.DEFINE_float}
    for field in dataclasses.fields(RunConfig):
        define.get(field.type, flags.DEFINE_string)(field.name, field.default,
                                                    _HELP[field.name], **fv)


def parse_args(argv: list[str]) -> tuple[RunConfig, str | None]:
    """(config, workdir) from a command line, in-process (tests, sweeps)."""
    flag_values, positional = parse_argv(define_flags, argv, "deeprnn.train")
    if positional:
        raise UsageError(f"unexpected arguments {positional}; every setting is a --flag")
    return config_from_flags(flag_values), flag_values.workdir


def config_from_flags(values=flags.FLAGS) -> RunConfig:
    return validate(RunConfig(**{f.name: values[f.name].value
                                 for f in dataclasses.fields(RunConfig)}))


def validate(config: RunConfig) -> RunConfig:
    """Rejects values that cannot work, with one line naming the flag and the fix."""
    for name in CHOICES:
        check_choice(name, getattr(config, name))
    check_model(**dataclasses.asdict(config))
    positive = ("batch_size", "num_steps", "eval_batch_size", "log_every", "sample_length",
                "max_to_keep", "num_seeds", "steps_per_call")
    for name in positive:
        if getattr(config, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(config, name)}")
    non_negative = ("max_tokens", "num_epochs", "num_train_steps", "eval_every",
                    "sample_every", "checkpoint_every", "warmup_steps")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise UsageError(f"--{name} must be 0 or more, got {getattr(config, name)}")
    for name in UPPER_BOUNDS:
        check_at_most(name, getattr(config, name))
    check_seed(config.seed)
    if config.seed + config.num_seeds - 1 > SEED_MAX:
        raise UsageError(f"--seed={config.seed} with --num_seeds={config.num_seeds} trains seeds"
                         f" up to {config.seed + config.num_seeds - 1}, above {SEED_MAX} (JAX's "
                         "PRNG takes a 32-bit seed); lower --seed")
    check_multihost(config.multihost, config.coordinator_address, config.num_processes,
                    config.process_id)
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise UsageError(f"--lr must be a positive number, got {config.lr}; the book uses 2")
    if not config.clip_norm > 0:
        raise UsageError(f"--clip_norm must be positive, got {config.clip_norm}; the book uses 1")
    if config.num_epochs == 0 and config.num_train_steps == 0:
        raise UsageError("no training budget: set --num_epochs or --num_train_steps above 0")
    for name in ("eval_every", "sample_every", "checkpoint_every"):
        if getattr(config, name) % config.steps_per_call:
            raise UsageError(f"--{name}={getattr(config, name)} must be a multiple of "
                             f"--steps_per_call={config.steps_per_call}")
    if config.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise UsageError("--tensorboard needs tensorboardX, which is not installed: pip install "
                         "tensorboardX, or pass --notensorboard to write metrics.jsonl only")
    if config.lstm_kernel == "cudnn" and config.num_seeds > 1:
        raise UsageError(f"--lstm_kernel=cudnn cannot run --num_seeds={config.num_seeds}: "
                         "jax.experimental.rnn has no vmap rule; use --lstm_kernel=auto")
    config.split_fractions()
    profile_steps(config)
    return config


def profile_steps(config: RunConfig) -> tuple[int, int] | None:
    if not config.profile_steps:
        return None
    try:
        first, last = (int(s) for s in config.profile_steps.split(","))
    except ValueError:
        first, last = -1, -1
    if not 0 <= first <= last:
        raise UsageError(f"--profile_steps={config.profile_steps!r} must be A,B with 0 <= A <= B")
    return first, last


def model_flag_differences(saved: dict, config: RunConfig) -> list[str]:
    """The resume-defining flags whose values differ from a checkpoint's saved flags."""
    current = dataclasses.asdict(config)
    differ = [f"--{k} (checkpoint {saved.get(k)!r}, now {current[k]!r})"
              for k in RESUME_KEYS if k in saved and saved[k] != current[k]]
    # scratch and fused share one parameter layout; flax's cells have their own.
    if "impl" in saved and (saved["impl"] == "flax") != (config.impl == "flax"):
        differ.append(f"--impl (checkpoint {saved['impl']!r}, now {config.impl!r})")
    return differ
