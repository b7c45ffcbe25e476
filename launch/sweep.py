"""What every launcher shares: load a sweep, expand it to runs, build each run's command lines.

A sweep is a module in `experiments/sweeps/` (or a path to a .py file) that defines
`BASE_FLAGFILE` and `runs()`; see `experiments/sweeps/__init__.py` for the format.
"""

import fnmatch
import importlib.util
import os
import pathlib
import re
import shlex
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

from absl import flags

from deeprnn.errors import UsageError, help_form, parse_argv

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SWEEPS_DIR = REPO_ROOT / "experiments" / "sweeps"
# Run names become directory names locally and on GCS, and (lower-cased) TPU names.
# Use fullmatch: "$" lets a final newline through.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FLAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a run entry's optional third element may hold.
METADATA_KEYS = ("eval_corpora",)


@dataclass(frozen=True)
class Run:
    name: str
    flags: dict  # overrides of the base flagfile, in the order the sweep gave them
    eval_corpora: tuple[str, ...] = ()  # corpus specs to score the trained run on


@dataclass(frozen=True)
class Sweep:
    name: str
    base_flagfile: str
    runs: list[Run] = field(default_factory=list)


def load_sweep(name_or_path: str) -> Sweep:
    """Loads `experiments/sweeps/<name>.py`, or a sweep file given by its path, and expands it.
    Loaded by path, so it works from any working directory."""
    if name_or_path.endswith(".py"):
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise UsageError(f"sweep file {name_or_path} does not exist; pass an existing .py file")
    else:
        path = SWEEPS_DIR / f"{name_or_path}.py"
        if name_or_path.startswith("_") or not path.is_file():
            known = sorted(p.stem for p in SWEEPS_DIR.glob("[!_]*.py"))
            raise UsageError(
                f"unknown sweep {name_or_path!r}; pick one of {', '.join(known)} or a .py path"
            )
    spec = importlib.util.spec_from_file_location(f"deeprnn_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        for attribute in ("BASE_FLAGFILE", "runs"):
            if not hasattr(module, attribute):
                raise UsageError(f"sweep {path} defines no {attribute}; see {SWEEPS_DIR}")
        base = module.BASE_FLAGFILE
        if not isinstance(base, (str, os.PathLike)) or not str(base):
            raise UsageError(f"sweep {path}: BASE_FLAGFILE must be a flagfile path such as "
                             f"'experiments/time_machine_lstm.flags', got {_short(base)}; fix "
                             "the sweep file")
        runs = _expand(path, list(module.runs()))
    except UsageError:
        raise
    # A sweep file is the user's own Python, run here: whatever it raises while it loads or
    # while its runs() is expanded (a SyntaxError, a NameError, a TypeError from an entry of the
    # wrong shape) is bad input, named on one line rather than as the launcher's traceback.
    # Hence Exception, and SystemExit (a sys.exit in the file); not KeyboardInterrupt.
    except (Exception, SystemExit) as error:
        what = " ".join(str(error).split())
        raise UsageError(f"sweep {path}: {type(error).__name__}{': ' + what if what else ''}; "
                         "fix the sweep file") from error
    if not runs:
        raise UsageError(f"sweep {path}: runs() yields no run; yield at least one "
                         "(name, flags) entry")
    return Sweep(path.stem, str(base), runs)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _expand(path: pathlib.Path, entries) -> list[Run]:
    runs, seen = [], set()
    for entry in entries:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise UsageError(f"sweep {path}: run entry {_short(entry)} must be (name, flags) "
                             "or (name, flags, {'eval_corpora': [...]}); fix the sweep file")
        name, flags, *rest = entry
        metadata = rest[0] if rest else {}
        where = f"sweep {path}: run {name!r}"
        if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
            raise UsageError(f"{where}: its name must be [A-Za-z0-9_.-], not starting with "
                             "'.', '_' or '-'; rename it")
        if name in seen:
            raise UsageError(f"{where}: its name appears twice; give each run its own")
        seen.add(name)
        if not isinstance(flags, dict) or not all(
                isinstance(k, str) and _FLAG_NAME.fullmatch(k) for k in flags):
            raise UsageError(f"{where}: flags must be a dict of flag name to value, such as "
                             f"{{'cell': 'gru'}}, got {_short(flags)}; fix the sweep file")
        if "workdir" in flags:  # the launcher's own: SWEEP_DIR/<run> or gs://BUCKET/SWEEP/<run>
            raise UsageError(f"{where}: sets workdir, which the launcher sets for each run; "
                             "drop it from the sweep file")
        if not isinstance(metadata, dict):
            raise UsageError(f"{where}: its third element must be a dict such as "
                             f"{{'eval_corpora': [...]}}, got {_short(metadata)}; fix the sweep "
                             "file")
        unknown = sorted(repr(k) for k in metadata if k not in METADATA_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown metadata key {', '.join(unknown)}; use "
                             f"{' or '.join(METADATA_KEYS)}")
        eval_corpora = metadata.get("eval_corpora", ())
        if not isinstance(eval_corpora, (list, tuple)) or not all(
                isinstance(c, str) and c for c in eval_corpora):
            raise UsageError(f"{where}: eval_corpora must be a list of corpus specs, got "
                             f"{_short(eval_corpora)}; fix the sweep file")
        runs.append(Run(name, dict(flags), tuple(eval_corpora)))
    return runs


def select_runs(sweep: Sweep, patterns: str | None = None, seeds: str | None = None) -> Sweep:
    """Keeps the runs whose names match `patterns` (comma-separated globs) and, given `seeds`
    ("0,1,2"), repeats each kept run once per seed as `<name>_seed<s>` with `--seed=s`."""
    runs = sweep.runs
    if patterns:
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]
        if not runs:
            names = ", ".join(r.name for r in sweep.runs)
            raise UsageError(f"--runs={patterns} matches no run of {sweep.name}; runs: {names}")
    if seeds:
        try:
            seed_values = [int(s) for s in seeds.split(",")]
        except ValueError as error:
            raise UsageError(f"--seeds={seeds} must be comma-separated integers") from error
        if len(set(seed_values)) != len(seed_values):  # two runs would share one workdir
            raise UsageError(f"--seeds={seeds} names a seed twice; give each seed once")
        runs = [
            Run(f"{r.name}_seed{s}", {**r.flags, "seed": s}, r.eval_corpora)
            for r in runs
            for s in seed_values
        ]
    return Sweep(sweep.name, sweep.base_flagfile, runs)


def format_flag(name: str, value) -> str:
    if isinstance(value, bool):  # absl reads --flag=true / --flag=false
        value = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"--{name}={value}"


def train_args(
    sweep: Sweep,
    run: Run,
    workdir: str,
    *,
    data_dir: str | None = None,
    extra_flags: Sequence[str] = (),
) -> list[str]:
    """The flags of `python -m deeprnn.train` for one run. absl lets later flags override
    earlier ones and the flagfile, so the order is: flagfile, workdir, data_dir, the run's
    overrides, then the user's extra flags (which win over everything)."""
    args = [f"--flagfile={sweep.base_flagfile}", f"--workdir={workdir}"]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    args += [format_flag(k, v) for k, v in run.flags.items()]
    args += list(extra_flags)
    return args


def evaluate_args(
    workdir: str, corpus: str, *, data_dir: str | None = None, split: str = "test"
) -> list[str]:
    args = [f"--workdir={workdir}", f"--corpus={corpus}", f"--split={split}"]
    if data_dir:
        args.append(f"--data_dir={data_dir}")
    return args


def eval_result_name(corpus: str, split: str = "test") -> str:
    """Where launchers keep the JSON that `deeprnn.evaluate` prints, inside the run's workdir;
    `deeprnn.report` reads every `eval/*.json` there."""
    return f"eval/{re.sub(r'[^A-Za-z0-9_.-]+', '+', corpus)}-{split}.json"


def shell_join(args: Sequence[str], env: dict | None = None) -> str:
    prefix = "".join(f"{k}={shlex.quote(str(v))} " for k, v in (env or {}).items())
    return prefix + shlex.join(args)


def define_sweep_flags(values: flags.FlagValues) -> None:
    """The flags that choose and shape a sweep, the same for every launcher."""
    fv = {"flag_values": values}
    flags.DEFINE_string("sweep", None, "Name in experiments/sweeps/ or a .py path.", **fv)
    flags.DEFINE_string("runs", None, "Comma-separated run names or globs (default: all).", **fv)
    flags.DEFINE_string("seeds", None, "Repeat each run per seed, e.g. 0,1,2 (adds --seed=s).",
                        **fv)
    flags.DEFINE_string("data_dir", None, "Corpus mirror passed to train as --data_dir.", **fv)
    flags.DEFINE_multi_string(
        "extra_flags", [], "A train flag for every run, e.g. "
        "--extra_flags=--num_train_steps=100 (repeatable; train flags after a bare -- work "
        "too).", **fv)
    flags.DEFINE_boolean("dry_run", False, "Print every command, run none.", **fv)


def parse_launcher_args(define_flags, argv: Sequence[str], program: str, usage: str):
    """(flags as attributes, positional arguments) of a launcher's command line: absl flags,
    then train flags after a bare `--`, which join --extra_flags. --sweep is required. --help
    prints `usage` (parse_argv's own usage line names no positional argument) and the flags."""
    own, passthrough = split_passthrough(argv)
    if help_form(own):  # any of absl's spellings of help
        values = flags.FlagValues()
        define_flags(values)
        print(f"usage: {usage}\n\n{values.get_help()}")
        sys.exit(0)
    values, positional = parse_argv(define_flags, own, program)
    args = types.SimpleNamespace(**values.flag_values_dict())
    if not args.sweep:
        raise UsageError("--sweep is required: a name in experiments/sweeps/ or a .py path")
    args.extra_flags = [*args.extra_flags, *passthrough]
    check_extra_flags(args.extra_flags, args.seeds)
    return args, positional


def check_extra_flags(extra_flags: Sequence[str], seeds: str | None) -> None:
    """Extra train flags come last and win (absl), so they must not undo what the launcher
    sets per run: its workdir, or with --seeds, its seed."""
    for flag in extra_flags:
        name = flag.lstrip("-").split("=", 1)[0] if flag.startswith("-") else ""
        if name == "workdir":
            raise UsageError(f"train flag {flag} (from --extra_flags or after --) would undo "
                             "the launcher's --workdir, which puts each run in its own folder "
                             "of the sweep; drop it, and choose that folder with --sweep_dir "
                             "(launch.local) or --bucket and --sweep_name (launch.tpu)")
        if name == "seed" and seeds:
            raise UsageError(f"train flag {flag} (from --extra_flags or after --) would give "
                             f"every run of --seeds={seeds} that one seed; drop one of the two")


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`launcher ARGS -- --flag=v ...`: everything after a bare `--` goes to every train run."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []
