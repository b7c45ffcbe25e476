"""Checks of the launchers' input beyond a flag's type, so that bad input ends in one `error:`
line (status 2) before anything is created and before any gcloud call.

Checks of one flag's value are absl validators, registered with the flags: absl refuses the
value while parsing (`error: flag --X=V: <problem>; see python -m launch.tpu --help`), as it does
a value of the wrong type. Checks that need the sweep or the file system raise UsageError.
"""

import math
import pathlib
import re

from absl import flags

from deeprnn.errors import UsageError
from launch import sweep as sweeps
from launch import workers

MAX_WAIT_S = 86_400.0  # a day: more is a typo, and time.sleep overflows on huge values
# X.Y only: the workers' install step keeps a venv whose `python --version` starts with
# "Python X.Y." (so 3.12.4 would never match and the venv would be made on every install),
# and the version is part of a shell command line.
_PYTHON_VERSION = re.compile(r"3\.[0-9]+")
# gs://BUCKET[/PATH]. Bucket names (cloud.google.com/storage/docs/buckets#naming): lower-case
# letters, digits, '-', '_' and '.', starting and ending with a letter or digit, 3 to 63
# characters, or up to 222 with dots, each dot-separated part at most 63.
_GS_URL = re.compile(r"gs://(?P<bucket>[^/]*)(?P<path>/.*)?", re.DOTALL)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_OBJECT_PART = re.compile(r"[^\s*?\[\]#]+")  # no wildcards, which gcloud storage expands
GS_RULE = ("must be gs://BUCKET[/PATH]: a bucket name (lower-case letters, digits, '-', '_', "
           "'.'; cloud.google.com/storage/docs/buckets#naming) and folder names without "
           "wildcards or spaces")
# TPU accelerator types: a family and a count of chips or cores, e.g. v4-8, v5litepod-16.
_ACCELERATOR = re.compile(r"[a-z][a-z0-9]*-[1-9][0-9]*")
_TPU_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")  # TPU names start with a letter
# Run and sweep names, which name folders (locally, on gs://) and, lower-cased, TPUs.
NAME_RULE = "must be letters, digits, '_', '.' and '-', not starting with '.', '_' or '-'"


def _register(values: flags.FlagValues, name: str, check, message: str) -> None:
    flags.register_validator(name, check, message=message, flag_values=values)


def register_seconds(values: flags.FlagValues, name: str, *, zero_ok: bool,
                     at_most: float | None = MAX_WAIT_S) -> None:
    """--NAME is a finite number of seconds: > 0 (or >= 0 with zero_ok), and <= at_most.
    NaN passes absl's own bounds (every comparison with it is false), hence a validator."""
    low = "0 or more" if zero_ok else "more than 0"
    high = f" and at most {at_most:g}" if at_most is not None else ""
    default = values[name].default

    def check(value: float) -> bool:
        return (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
                and (at_most is None or value <= at_most))

    _register(values, name, check, f"must be a finite number of seconds, {low}{high}; e.g. "
                                   f"--{name}={default:g}")


def register_tpu_checks(values: flags.FlagValues) -> None:
    """The validators of launch.tpu's flags."""
    # A retry 0 s later, a first poll at once: both fine (the tests use them). A log copy every
    # 0 s (or NaN s) is `sleep 0` in a loop on every worker.
    register_seconds(values, "retry_s", zero_ok=True)
    register_seconds(values, "poll_s", zero_ok=True)
    register_seconds(values, "log_copy_s", zero_ok=False)
    register_seconds(values, "stall_s", zero_ok=False, at_most=None)
    _register(values, "sweep_name",
              lambda v: v is None or bool(sweeps.RUN_NAME.fullmatch(v)),
              f"{NAME_RULE} (it names the sweep's folder under --bucket); e.g. "
              "--sweep_name=depth_cell_v2")
    _register(values, "bucket", lambda v: v is None or is_gs_url(v),
              f"{GS_RULE}; e.g. --bucket=gs://my-bucket/sweeps")
    _register(values, "name_prefix", lambda v: bool(_TPU_PREFIX.fullmatch(v or "")),
              "must start with a letter, as TPU names do, then letters, digits, '-', '_' or "
              "'.'; e.g. --name_prefix=deeprnn")
    _register(values, "accelerator_type", lambda v: bool(_ACCELERATOR.fullmatch(v or "")),
              "must be FAMILY-COUNT such as v4-8, v5litepod-16 or v6e-8 (cloud.google.com/tpu/"
              "docs/regions-zones lists each zone's types)")
    _register(values, "python_version", lambda v: bool(_PYTHON_VERSION.fullmatch(v or "")),
              "must be a Python version X.Y such as 3.12 (uv installs its newest release); "
              "give only the major and minor version")


def is_gs_url(url: str) -> bool:
    match = _GS_URL.fullmatch(url)
    if not match or not _BUCKET.fullmatch(match["bucket"]):
        return False
    bucket_parts = match["bucket"].split(".")
    if any(not 0 < len(part) <= 63 for part in bucket_parts):
        return False
    parts = (match["path"] or "").split("/")[1:]
    if parts and parts[-1] == "":  # gs://bucket/sweeps/ as gs://bucket/sweeps
        parts.pop()
    return all(part not in (".", "..") and _OBJECT_PART.fullmatch(part) for part in parts)


def check_tpu_args(args) -> None:
    """What launch.tpu needs beyond each flag's own check."""
    for name in ("bucket", "zone"):
        if not getattr(args, name):
            raise UsageError(f"--{name} is required; see python -m launch.tpu --help")
    if args.data_dir and not args.data_dir.startswith("gs://"):
        raise UsageError(f"--data_dir={args.data_dir} is a folder on this machine, which the TPU "
                         "workers cannot read; omit it (each worker downloads its own copy of "
                         "the corpora) or copy the <name>.txt files to gs://BUCKET/corpora and "
                         "pass that")
    if args.data_dir and not is_gs_url(args.data_dir):
        raise UsageError(f"--data_dir={args.data_dir} {GS_RULE}; e.g. "
                         "--data_dir=gs://my-bucket/corpora")


def check_sweep_name(name: str) -> None:
    """The name of a sweep file, which names its folder under --bucket unless --sweep_name
    does."""
    if not sweeps.RUN_NAME.fullmatch(name):
        raise UsageError(f"sweep name {name!r}, from its file name, {NAME_RULE}, as it names "
                         "the sweep's folder under --bucket; rename the file or give "
                         "--sweep_name")


def existing_flagfile(sweep: sweeps.Sweep) -> pathlib.Path:
    """The sweep's BASE_FLAGFILE, which must exist; a relative path is read from the
    repository, where the runs run."""
    given = pathlib.Path(sweep.base_flagfile)
    path = given if given.is_absolute() else sweeps.REPO_ROOT / given
    if not path.is_file():
        raise UsageError(f"sweep {sweep.name}: flagfile {given} does not exist (a relative path "
                         f"is read from {sweeps.REPO_ROOT}); write it first")
    return path


def flagfile_for_workers(sweep: sweeps.Sweep, *, packed: bool) -> str:
    """The sweep's BASE_FLAGFILE as the TPU workers read it: relative to the code folder,
    which holds this repository (packed: its files that git does not ignore) or a clone of it.
    A flagfile elsewhere on this machine never reaches them."""
    path = existing_flagfile(sweep).resolve()
    try:
        relative = path.relative_to(sweeps.REPO_ROOT).as_posix()
    except ValueError:
        raise UsageError(f"sweep {sweep.name}: flagfile {sweep.base_flagfile} lies outside the "
                         f"repository {sweeps.REPO_ROOT}, which is all the TPU workers get; move "
                         "it into the repository, e.g. to experiments/") from None
    if packed and relative not in workers.source_files():
        raise UsageError(f"sweep {sweep.name}: flagfile {relative} is ignored by git, so the "
                         "copy of this tree sent to the TPU workers leaves it out; move it "
                         "to experiments/ or stop ignoring it")
    return relative


def check_local_dirs(sweep_dir: pathlib.Path, data_dir: str | None) -> None:
    """launch.local's folders, before any run: SWEEP_DIR must be (or can become) a folder, and
    a local --data_dir must be one, or every run would fail on it in turn."""
    existing = next(p for p in (sweep_dir, *sweep_dir.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--sweep_dir={sweep_dir}: {existing} is a file, not a folder; give a "
                         "new or existing folder")
    if data_dir and "://" not in data_dir and not pathlib.Path(data_dir).is_dir():
        raise UsageError(f"--data_dir={data_dir} is not a folder; give the folder of the "
                         "<name>.txt corpus files, or omit it (each run then downloads its own)")
