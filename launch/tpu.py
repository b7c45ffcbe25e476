"""Run a sweep on Cloud TPU VMs: one TPU per run, workdirs on GCS, Spot preemptions re-queued.

    python -m launch.tpu COMMAND --sweep=depth_cell --bucket=gs://BUCKET --project=P \
        --zone=us-central2-b [--accelerator_type=v4-8] [--runtime_version=IMAGE] \
        [--spot] [--no_queue] [--repo_url=URL --ref=REF] [--runs=...] [--dry_run] [-- train flags]

COMMAND is one of
    up       create (queue) one TPU per run: `gcloud compute tpus queued-resources create`
    run      on every ready TPU: install the code on all workers, start the run in the background
    status   each run's TPU state and its progress (read from gs://.../summary.json)
    requeue  delete and re-create TPUs that were preempted (PREEMPTED, SUSPENDED, FAILED)
    watch    loop: re-queue preempted TPUs, start runs on ready ones, until every run finished
    down     delete the TPUs

Run R of sweep S writes to gs://BUCKET/S/R, so `tensorboard --logdir=gs://BUCKET/S` overlays
the runs. A re-queued TPU is a fresh VM: `run` installs the code again and the training program
resumes from the newest checkpoint in the run's gs:// workdir. Every gcloud call goes through
`Gcloud.__call__`, which runs the `gcloud` found first on PATH.
"""

import json
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

from absl import flags

from deeprnn.errors import UsageError, exit_on_usage_error
from deeprnn.run.summary import is_finished
from launch import sweep as sweeps

READY_STATES = {"ACTIVE", "READY"}  # queued resource / TPU VM
# A Spot TPU's queued resource goes SUSPENDING -> SUSPENDED when preempted (its node reads
# PREEMPTED); FAILED means the request itself failed. All of them come back only by a new request.
REQUEUE_STATES = {"PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "NOT_FOUND"}
REMOTE_CODE = "~/deeprnn"
REMOTE_RUNS = "~/deeprnn-runs"  # logs and run locks on each worker
REMOTE_PYTHON = "$HOME/venv/bin/python"
# The TPU software version (VM image) each TPU generation needs, by the accelerator type's
# prefix (cloud.google.com/tpu/docs/runtimes: "v4 and older: tpu-ubuntu2204-base"; v5e, v5p and
# Trillium have images of their own). A v5e slice created with the v4 image does not run JAX.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}
# Python of the workers' venv. JAX 0.11 and later require Python >= 3.12 (PyPI's Requires-Python),
# and libtpu 0.0.43 dropped 3.11 "following Jax" (its release notes): on 3.11, pip resolves
# jax[tpu] to 0.10.2 at best. TPU images ship 3.10, so uv installs this one beside it.
PYTHON_VERSION = "3.12"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def runtime_version_for(accelerator_type: str) -> str:
    """The TPU VM image for an accelerator type such as v4-32 or v5litepod-8."""
    generation = accelerator_type.lower().rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        known = ", ".join(f"{g}-N" for g in RUNTIME_VERSIONS)
        raise UsageError(f"no known TPU software version for --accelerator_type="
                         f"{accelerator_type} (known: {known}); give --runtime_version, see "
                         "cloud.google.com/tpu/docs/runtimes")
    return RUNTIME_VERSIONS[generation]


class Gcloud:
    """The one door to gcloud: prints each call, and runs it unless this is a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, args: Sequence[str], *, capture: bool = False, check: bool = True):
        command = ["gcloud", *args]
        if self.dry_run:
            print(sweeps.shell_join(command), flush=True)
        elif not capture:  # queries (describe, cat) stay quiet; actions are echoed as they run
            print("+ " + sweeps.shell_join(command), flush=True)
        if self.dry_run:
            return None
        try:
            return subprocess.run(command, check=check, text=True, capture_output=capture)
        except FileNotFoundError as error:
            raise UsageError("gcloud is not on PATH; install the Google Cloud CLI and run "
                             "`gcloud auth login`") from error


class TpuLauncher:
    def __init__(self, args, sweep: sweeps.Sweep):
        self.args, self.sweep = args, sweep
        self.gcloud = Gcloud(args.dry_run)
        self.sweep_name = args.sweep_name or sweep.name
        project = [f"--project={args.project}"] if args.project else []
        self.location = [f"--zone={args.zone}", *project]
        # The workers write checkpoints and logs to the bucket as this service account (default:
        # the project's Compute Engine one). The cloud-platform scope leaves the decision to its
        # IAM roles instead of a narrower scope set on the VM.
        self.access = [*([f"--service-account={args.service_account}"]
                         if args.service_account else []), f"--scopes={CLOUD_PLATFORM_SCOPE}"]
        self._source_tarball: str | None = None
        owners: dict[str, str] = {}  # names are lower-cased, sanitised and cut to 63 chars
        for run in sweep.runs:
            other = owners.setdefault(self.tpu_name(run), run.name)
            if other != run.name:
                raise UsageError(f"runs {other} and {run.name} would share the TPU name "
                                 f"{self.tpu_name(run)}; rename one, or shorten --name_prefix "
                                 "or --sweep_name")

    # Names and places.
    def tpu_name(self, run: sweeps.Run) -> str:
        # TPU names: lower-case letters, digits and hyphens, starting with a letter, <= 63 chars.
        name = f"{self.args.name_prefix}-{self.sweep_name}-{run.name}".lower()
        name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")
        return name[:63].rstrip("-")

    def workdir(self, run: sweeps.Run) -> str:
        return f"{self.args.bucket.rstrip('/')}/{self.sweep_name}/{run.name}"

    # TPU life cycle.
    def create(self, run: sweeps.Run) -> None:
        name, a = self.tpu_name(run), self.args
        version = "--version" if a.no_queue else "--runtime-version"
        options = [f"--accelerator-type={a.accelerator_type}",
                   f"{version}={a.runtime_version}", *self.access, *(["--spot"] if a.spot else [])]
        if a.no_queue:
            self.gcloud(["compute", "tpus", "tpu-vm", "create", name, *self.location, *options])
        else:
            self.gcloud(["compute", "tpus", "queued-resources", "create", name,
                         f"--node-id={name}", *self.location, *options])

    def delete(self, run: sweeps.Run) -> None:
        name = self.tpu_name(run)
        if self.args.no_queue:
            self.gcloud(["compute", "tpus", "tpu-vm", "delete", name, *self.location, "--quiet"])
        else:  # --force also deletes the TPU VM the queued resource holds
            self.gcloud(["compute", "tpus", "queued-resources", "delete", name, *self.location,
                         "--force", "--quiet"])

    def state(self, run: sweeps.Run) -> str | None:
        """ACTIVE/READY, PREEMPTED, SUSPENDED, ..., NOT_FOUND; None in a dry run."""
        name = self.tpu_name(run)
        if self.args.no_queue:
            args = ["compute", "tpus", "tpu-vm", "describe", name, *self.location,
                    "--format=value(state)"]
        else:
            args = ["compute", "tpus", "queued-resources", "describe", name, *self.location,
                    "--format=value(state.state)"]
        result = self.gcloud(args, capture=True, check=False)
        if result is None:
            return None
        if result.returncode != 0:
            if "NOT_FOUND" in result.stderr or "not found" in result.stderr:
                return "NOT_FOUND"
            # Anything else (auth, quota, typo in --zone) must not read as "gone, create it".
            raise subprocess.CalledProcessError(result.returncode, ["gcloud", *args],
                                                result.stdout, result.stderr)
        return result.stdout.strip().upper() or "UNKNOWN"

    def summary(self, run: sweeps.Run) -> dict | None:
        result = self.gcloud(["storage", "cat", f"{self.workdir(run)}/summary.json"],
                             capture=True, check=False)
        if result is None or result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    # Code and runs on the workers.
    def ssh(self, run: sweeps.Run, command: str) -> None:
        self.gcloud(["compute", "tpus", "tpu-vm", "ssh", self.tpu_name(run), *self.location,
                     "--worker=all", f"--command={command}"])

    def install(self, run: sweeps.Run) -> None:
        """Python --python_version in ~/venv, the code in ~/deeprnn, '.[tpu,gcs]'."""
        a = self.args
        # One command per step: `set -e` ignores a failure inside an && chain, which let a
        # failed fetch install the old checkout. FETCH_HEAD is the ref as the remote has it
        # now (a branch's newest commit, a tag, a commit), whatever was checked out before.
        if a.repo_url:
            fetch = [f"[ -d {REMOTE_CODE} ] || git clone -q {shlex.quote(a.repo_url)} "
                     f"{REMOTE_CODE}", f"cd {REMOTE_CODE}",
                     f"git fetch -q origin {shlex.quote(a.ref)}",
                     "git checkout -q --force --detach FETCH_HEAD"]
        else:
            tarball = self.source_tarball()
            self.gcloud(["compute", "tpus", "tpu-vm", "scp", tarball,
                         f"{self.tpu_name(run)}:deeprnn-src.tar.gz", *self.location,
                         "--worker=all"])
            fetch = [f"rm -rf {REMOTE_CODE}", f"mkdir -p {REMOTE_CODE}",
                     f"tar -xzf ~/deeprnn-src.tar.gz -C {REMOTE_CODE}", f"cd {REMOTE_CODE}"]
        steps = [
            "set -e",
            f"mkdir -p {REMOTE_RUNS}",
            # A worker still running this run keeps its code: the lock says it is busy.
            f"exec 9>{REMOTE_RUNS}/{run.name}.lock",
            f'if ! flock -n 9; then echo "{run.name}: running, code left as is"; exit 0; fi',
            "python3 -m pip install -q --user uv",
            # A venv of another Python (an older launcher's, or another --python_version) is
            # made again: its packages would be resolved for that Python.
            f"{REMOTE_PYTHON} --version 2>&1 | grep -qF 'Python {a.python_version}.' || "
            f"~/.local/bin/uv venv -q --clear --python {a.python_version} $HOME/venv",
            *fetch,
            f'~/.local/bin/uv pip install -q --python {REMOTE_PYTHON} -e ".[tpu,gcs]"',
        ]
        self.ssh(run, "; ".join(steps))

    def start(self, run: sweeps.Run) -> None:
        """Starts the run detached on every worker; a run already holding its lock is left be."""
        workdir, a = self.workdir(run), self.args
        train = sweeps.train_args(self.sweep, run, workdir, data_dir=a.data_dir,
                                  extra_flags=a.extra_flags)
        # Every worker of a pod slice runs the same command and --multihost joins them into one
        # JAX system (its arguments come from the TPU environment; harmless on one host).
        script = [f"{REMOTE_PYTHON} -m deeprnn.train {shlex.join(train)} --multihost"]
        for corpus in run.eval_corpora:
            # Also on every worker and under jax.distributed: a pod slice computes only with all
            # its hosts ("jax.device_count() hangs until called on every host",
            # cloud.google.com/tpu/docs/jax-pods). Process 0 alone writes the result.
            evaluate = sweeps.evaluate_args(workdir, corpus, data_dir=a.data_dir)
            result = f"{workdir}/{sweeps.eval_result_name(corpus)}"
            script.append(f"{REMOTE_PYTHON} -m deeprnn.evaluate {shlex.join(evaluate)} "
                          f"--multihost --output={shlex.quote(result)}")
        inner = "set -o pipefail; " + " && ".join(script)
        lock, log = f"{REMOTE_RUNS}/{run.name}.lock", f"{REMOTE_RUNS}/{run.name}.log"
        self.ssh(run, f"mkdir -p {REMOTE_RUNS} && cd {REMOTE_CODE} && setsid nohup flock -n "
                      f"{lock} bash -c {shlex.quote(inner)} >> {log} 2>&1 < /dev/null &")

    def source_tarball(self) -> str:
        """The working tree (tracked and untracked, not ignored) packed once per invocation."""
        if self._source_tarball is None:
            path = pathlib.Path(tempfile.gettempdir()) / f"deeprnn-src-{self.sweep_name}.tar.gz"
            files = _source_files()
            if self.args.dry_run:
                print(f"# pack {len(files)} files of {sweeps.REPO_ROOT} into {path}")
            else:
                with tarfile.open(path, "w:gz") as tar:
                    for file in files:
                        tar.add(sweeps.REPO_ROOT / file, arcname=file)
            self._source_tarball = str(path)
        return self._source_tarball

    # Subcommands.
    def up(self) -> None:
        for run in self.sweep.runs:
            self.create(run)

    def run(self, only: set[str] | None = None) -> set[str]:
        started = set()
        for run in self.sweep.runs:
            if only is not None and run.name not in only:
                continue
            state = self.state(run)
            if state is not None and state not in READY_STATES:
                print(f"# {run.name}: TPU {state}, not started")
                continue
            if is_finished(self.summary(run)):
                print(f"# {run.name}: finished, not started")
                continue
            self.install(run)
            self.start(run)
            started.add(run.name)
        if only is None:  # once, not on every poll of `watch`
            print(f"# compare: tensorboard --logdir={self.args.bucket.rstrip('/')}/"
                  f"{self.sweep_name}")
        return started

    def status(self) -> dict[str, tuple[str | None, dict | None]]:
        table = {}
        for run in self.sweep.runs:
            state, summary = self.state(run), self.summary(run)
            table[run.name] = (state, summary)
            if self.args.dry_run:
                continue
            done = (summary or {}).get("steps_done", 0)
            total = ((summary or {}).get("flags") or {}).get("num_train_steps", "?")
            progress = f"{done}/{total} steps"
            if is_finished(summary):
                progress = "finished"
            print(f"{run.name:24s} {self.tpu_name(run):40s} {state:12s} {progress}")
        return table

    def requeue(self) -> list[str]:
        requeued = []
        for run in self.sweep.runs:
            state = self.state(run)
            if state is None:
                print(f"# if {run.name}'s TPU is {'/'.join(sorted(REQUEUE_STATES))}:")
            elif state not in REQUEUE_STATES:
                continue
            elif is_finished(self.summary(run)):
                continue  # preempted after it finished: nothing left to do
            else:
                print(f"# {run.name}: TPU {state}, queued again")
            if state != "NOT_FOUND":
                self.delete(run)
            self.create(run)
            requeued.append(run.name)
        return requeued

    def watch(self) -> None:
        started: set[str] = set()
        polls = 1 if self.args.dry_run else self.args.max_polls  # a dry run shows one round
        for _ in range(polls):
            for name in self.requeue():
                started.discard(name)
            states = {run.name: self.state(run) for run in self.sweep.runs}
            ready = {name for name, state in states.items() if state in READY_STATES}
            started |= self.run(only=ready - started)
            if self.args.dry_run:
                return
            summaries = [self.summary(run) for run in self.sweep.runs]
            if all(is_finished(s) for s in summaries):
                print("# every run finished; delete the TPUs with `down`")
                return
            time.sleep(self.args.poll_s)

    def down(self) -> None:
        for run in self.sweep.runs:
            self.delete(run)


def _source_files() -> list[str]:
    try:  # read-only: which files git would ship, untracked ones included
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"],
                                 cwd=sweeps.REPO_ROOT, check=True, text=True, capture_output=True)
        files = listing.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(sweeps.REPO_ROOT)) for p in sweeps.REPO_ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    return sorted(f for f in files if (sweeps.REPO_ROOT / f).is_file())


COMMANDS = ("up", "run", "status", "requeue", "watch", "down")


def define_flags(values: flags.FlagValues) -> None:
    fv = {"flag_values": values}
    sweeps.define_sweep_flags(values)
    flags.DEFINE_string("bucket", None, "gs://BUCKET[/PREFIX] for the workdirs.", **fv)
    flags.DEFINE_string("sweep_name", None, "Folder under the bucket (default: the sweep's "
                        "name).", **fv)
    flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).", **fv)
    flags.DEFINE_string("zone", None, "e.g. us-central2-b for v4.", **fv)
    flags.DEFINE_string("accelerator_type", "v4-8", "TPU type, e.g. v4-8, v5litepod-8.", **fv)
    flags.DEFINE_string("runtime_version", None, "TPU software version (VM image); default: "
                        "the one for --accelerator_type (v4: tpu-ubuntu2204-base, v5e: "
                        "v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).", **fv)
    flags.DEFINE_boolean("spot", False, "Spot TPUs (re-queued on preemption).", **fv)
    flags.DEFINE_string("service_account", None, "Service account (email) of the TPU VMs; it "
                        "needs write access to --bucket (default: the project's Compute Engine "
                        "default service account).", **fv)
    flags.DEFINE_boolean("no_queue", False, "tpu-vm create/delete instead of queued "
                         "resources.", **fv)
    flags.DEFINE_string("name_prefix", "deeprnn", "TPU names: PREFIX-SWEEP-RUN.", **fv)
    flags.DEFINE_string("repo_url", None, "git clone this on the TPUs (default: copy this "
                        "tree).", **fv)
    flags.DEFINE_string("ref", "main", "Commit or branch to check out.", **fv)
    flags.DEFINE_string("python_version", PYTHON_VERSION, "Python for the workers' venv (3.12: "
                        "newer JAX and libtpu need it).", **fv)
    flags.DEFINE_float("poll_s", 300, "watch: seconds between polls.", **fv)
    flags.DEFINE_integer("max_polls", 10_000, "watch: give up after N polls.", **fv)


def parse_args(argv: Sequence[str]):
    """COMMAND first (or anywhere before a bare --), then flags."""
    args, positional = sweeps.parse_launcher_args(define_flags, argv, "launch.tpu")
    if len(positional) != 1 or positional[0] not in COMMANDS:
        raise UsageError(f"give one command of {', '.join(COMMANDS)} (got "
                         f"{' '.join(positional) or 'none'}), e.g. python -m launch.tpu up "
                         "--sweep=depth_cell --bucket=gs://BUCKET --zone=ZONE")
    args.command = positional[0]
    for name in ("bucket", "zone"):
        if not getattr(args, name):
            raise UsageError(f"--{name} is required; see python -m launch.tpu --help")
    if not args.bucket.startswith("gs://"):
        raise UsageError(f"--bucket={args.bucket} must start with gs://")
    args.runtime_version = args.runtime_version or runtime_version_for(args.accelerator_type)
    if args.data_dir and not args.data_dir.startswith("gs://"):
        raise UsageError(f"--data_dir={args.data_dir} is a folder on this machine, which the TPU "
                         "workers cannot read; omit it (each worker downloads its own copy of "
                         "the corpora) or copy the <name>.txt files to gs://BUCKET/corpora and "
                         "pass that")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sweep = sweeps.select_runs(sweeps.load_sweep(args.sweep), args.runs, args.seeds)
    getattr(TpuLauncher(args, sweep), args.command)()
    return 0


def entry_point() -> None:
    try:
        with exit_on_usage_error():
            sys.exit(main())
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines()
        print(f"error: {shlex.join(error.cmd)} failed with exit code {error.returncode}"
              + (f": {detail[-1]}" if detail else ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    entry_point()
