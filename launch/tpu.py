"""Run a sweep on Cloud TPU VMs: one TPU per run, workdirs on GCS, Spot preemptions re-queued.

    python -m launch.tpu COMMAND --sweep=depth_cell --bucket=gs://BUCKET --project=P \
        --zone=us-central2-b [--accelerator_type=v4-8] [--runtime_version=IMAGE] \
        [--spot] [--no_queue] [--service_account=SA] [--repo_url=URL --ref=REF] [--runs=...] \
        [--dry_run] [-- train flags]

COMMAND is one of
    up       create (queue) one TPU per run: `gcloud compute tpus queued-resources create`
    run      on every ready TPU: install the code on all workers, start the run in the background
    status   each run's TPU state and its progress (read from gs://.../summary.json)
    requeue  delete and re-create TPUs that were preempted (PREEMPTED, SUSPENDED, FAILED)
    watch    loop until every run finished or failed: re-queue preempted TPUs, start runs on
             ready ones, restart dead or stalled runs a bounded number of times (launch.watch)
    down     delete the TPUs

Run R of sweep S writes to gs://BUCKET/S/R, so `tensorboard --logdir=gs://BUCKET/S` overlays
the runs. A re-queued TPU is a fresh VM: `run` installs the code again and the training program
resumes from the newest checkpoint in the run's gs:// workdir. Every gcloud call goes through
launch.gcloud.Gcloud, which retries what passes; what runs on the workers is launch.workers.
"""

import dataclasses
import json
import pathlib
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence

from absl import flags

from deeprnn.errors import UsageError, exit_on_usage_error
from deeprnn.run.summary import is_finished
from launch import checks, workers
from launch import sweep as sweeps
from launch.gcloud import ALREADY_EXISTS, NOT_FOUND, Gcloud, GcloudError
from launch.watch import Watch

READY_STATES = {"ACTIVE", "READY"}  # queued resource / TPU VM
# A Spot TPU's queued resource goes SUSPENDING -> SUSPENDED when preempted (its node reads
# PREEMPTED); FAILED means the request itself failed. All of them come back only by a new request.
REQUEUE_STATES = {"PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "NOT_FOUND"}
FAILED_FILE = "launch_failed.json"  # in a run's workdir: watch gave up on it, and why
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


class TpuLauncher:
    def __init__(self, args, sweep: sweeps.Sweep):
        self.args, self.sweep = args, sweep
        self.gcloud = Gcloud(args.dry_run, retries=args.gcloud_retries, backoff_s=args.retry_s)
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

    # Names, places, states.
    @staticmethod
    def ready(state: str | None) -> bool:
        return state in READY_STATES

    @staticmethod
    def lost(state: str | None) -> bool:
        """Gone for good: only a new request brings it back."""
        return state in REQUEUE_STATES

    def tpu_name(self, run: sweeps.Run) -> str:
        # TPU names: lower-case letters, digits and hyphens, starting with a letter, <= 63 chars.
        name = f"{self.args.name_prefix}-{self.sweep_name}-{run.name}".lower()
        name = re.sub(r"[^a-z0-9-]+", "-", name).strip("-")
        return name[:63].rstrip("-")

    def workdir(self, run: sweeps.Run) -> str:
        return f"{self.args.bucket.rstrip('/')}/{self.sweep_name}/{run.name}"

    # TPU life cycle. A create of a TPU that exists, or a delete of one that is gone, is done.
    def create(self, run: sweeps.Run) -> None:
        name, a = self.tpu_name(run), self.args
        version = "--version" if a.no_queue else "--runtime-version"
        options = [f"--accelerator-type={a.accelerator_type}",
                   f"{version}={a.runtime_version}", *self.access, *(["--spot"] if a.spot else [])]
        group = ["tpu-vm", "create", name] if a.no_queue else [
            "queued-resources", "create", name, f"--node-id={name}"]
        result = self.gcloud(["compute", "tpus", *group, *self.location, *options],
                             accept=[ALREADY_EXISTS])
        if result is not None and result.returncode != 0:
            print(f"# {run.name}: {name} exists already")

    def delete(self, run: sweeps.Run) -> None:
        name = self.tpu_name(run)
        if self.args.no_queue:
            args = ["tpu-vm", "delete", name, *self.location, "--quiet"]
        else:  # --force also deletes the TPU VM the queued resource holds
            args = ["queued-resources", "delete", name, *self.location, "--force", "--quiet"]
        self.gcloud(["compute", "tpus", *args], accept=[NOT_FOUND])

    def state(self, run: sweeps.Run) -> str | None:
        """ACTIVE/READY, PREEMPTED, SUSPENDED, ..., NOT_FOUND; None in a dry run."""
        name = self.tpu_name(run)
        if self.args.no_queue:
            args = ["tpu-vm", "describe", name, *self.location, "--format=value(state)"]
        else:
            args = ["queued-resources", "describe", name, *self.location,
                    "--format=value(state.state)"]
        # Anything but NOT_FOUND (auth, quota, a typo in --zone) must not read as "gone,
        # create it": GcloudError.
        result = self.gcloud(["compute", "tpus", *args], capture=True, accept=[NOT_FOUND])
        if result is None:
            return None
        if result.returncode != 0:
            return "NOT_FOUND"
        return result.stdout.strip().upper() or "UNKNOWN"

    def read_json(self, run: sweeps.Run, name: str) -> dict | None:
        """`<workdir>/<name>` (summary.json, FAILED_FILE), or None if absent (or a dry run)."""
        result = self.gcloud(["storage", "cat", f"{self.workdir(run)}/{name}"], capture=True,
                             accept=[NOT_FOUND])
        if result is None or result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:  # cut off mid-write: as good as absent
            return None

    def summary(self, run: sweeps.Run) -> dict | None:
        return self.read_json(run, "summary.json")

    def failure(self, run: sweeps.Run) -> dict | None:
        return self.read_json(run, FAILED_FILE)

    def mark_failed(self, run: sweeps.Run, reason: str, restarts: int) -> None:
        """Records why the run was given up (run, watch and requeue then leave it) and deletes
        its TPU, which would otherwise be billed for nothing."""
        record = json.dumps({"reason": reason, "restarts": restarts}) + "\n"
        url = f"{self.workdir(run)}/{FAILED_FILE}"
        self.gcloud(["storage", "cp", "-", url], stdin=record)
        print(f"# {run.name}: FAILED ({reason}); deleting its TPU. To try again: gcloud storage "
              f"rm {url}")
        self.delete(run)

    # Code and runs on the workers.
    def ssh(self, run: sweeps.Run, command: str, capture: bool = False):
        return self.gcloud(["compute", "tpus", "tpu-vm", "ssh", self.tpu_name(run),
                            *self.location, "--worker=all", f"--command={command}"],
                           capture=capture)

    def install(self, run: sweeps.Run) -> None:
        a = self.args
        if a.repo_url:
            fetch = workers.clone_steps(a.repo_url, a.ref)
        else:
            tarball = self.source_tarball()
            self.gcloud(["compute", "tpus", "tpu-vm", "scp", tarball,
                         f"{self.tpu_name(run)}:{workers.REMOTE_TARBALL}", *self.location,
                         "--worker=all"])
            fetch = workers.unpack_steps()
        self.ssh(run, workers.install_script(run.name, a.python_version, fetch))

    def start(self, run: sweeps.Run) -> None:
        """Starts the run detached on every worker; a run already holding its lock is left be."""
        workdir, a, python = self.workdir(run), self.args, workers.REMOTE_PYTHON
        train = sweeps.train_args(self.sweep, run, workdir, data_dir=a.data_dir,
                                  extra_flags=a.extra_flags)
        # Every worker of a pod slice runs the same command and --multihost joins them into one
        # JAX system (its arguments come from the TPU environment; harmless on one host).
        commands = [f"{python} -m deeprnn.train {shlex.join(train)} --multihost"]
        for corpus in run.eval_corpora:
            # Also on every worker and under jax.distributed: a pod slice computes only with all
            # its hosts ("jax.device_count() hangs until called on every host",
            # cloud.google.com/tpu/docs/jax-pods). Process 0 alone writes the result.
            evaluate = sweeps.evaluate_args(workdir, corpus, data_dir=a.data_dir)
            result = f"{workdir}/{sweeps.eval_result_name(corpus)}"
            commands.append(f"{python} -m deeprnn.evaluate {shlex.join(evaluate)} --multihost "
                            f"--output={shlex.quote(result)}")
        self.ssh(run, workers.start_script(run.name, commands, workdir, a.log_copy_s))

    def probe(self, run: sweeps.Run) -> list[workers.WorkerState]:
        """Whether the run's processes live, per worker, and how the last attempt ended."""
        result = self.ssh(run, workers.probe_script(run.name), capture=True)
        return workers.parse_probe(result.stdout) if result is not None else []

    def stop(self, run: sweeps.Run) -> None:
        self.ssh(run, workers.stop_script(run.name))

    def source_tarball(self) -> str:
        """This working tree, packed once per invocation."""
        if self._source_tarball is None:
            path = pathlib.Path(tempfile.gettempdir()) / f"deeprnn-src-{self.sweep_name}.tar.gz"
            workers.pack_source(path, dry_run=self.args.dry_run)
            self._source_tarball = str(path)
        return self._source_tarball

    # Subcommands: each run on its own, so that one run's failure leaves the others be.
    def for_each_run(self, action: Callable[[sweeps.Run], None]) -> int:
        failed = []
        for run in self.sweep.runs:
            try:
                action(run)
            except GcloudError as error:
                print(f"error: {run.name}: {error}", file=sys.stderr, flush=True)
                failed.append(run.name)
        if failed:
            print(f"# {len(failed)} of {len(self.sweep.runs)} runs failed: {', '.join(failed)}")
        return 1 if failed else 0

    def up(self) -> int:
        return self.for_each_run(self.create)

    def run(self) -> int:
        code = self.for_each_run(self.run_one)
        print(f"# compare: tensorboard --logdir={self.args.bucket.rstrip('/')}/{self.sweep_name}")
        return code

    def run_one(self, run: sweeps.Run) -> bool:
        """Installs and starts `run` if its TPU is ready and it is neither finished nor failed."""
        state = self.state(run)
        if state is not None and state not in READY_STATES:
            print(f"# {run.name}: TPU {state}, not started")
            return False
        if is_finished(self.summary(run)) or self.failure(run):
            print(f"# {run.name}: finished or failed, not started")
            return False
        self.install(run)
        self.start(run)
        return True

    def status(self) -> int:
        def show(run):
            state, summary, failure = self.state(run), self.summary(run), self.failure(run)
            if self.args.dry_run:
                return
            done = (summary or {}).get("steps_done", 0)
            total = ((summary or {}).get("flags") or {}).get("num_train_steps", "?")
            progress = f"{done}/{total} steps"
            if is_finished(summary):
                progress = "finished"
            if failure:
                progress += f", FAILED: {failure.get('reason')}"
            print(f"{run.name:24s} {self.tpu_name(run):40s} {state:12s} {progress}")
        return self.for_each_run(show)

    def requeue(self) -> int:
        return self.for_each_run(lambda run: self.requeue_one(run, self.state(run)))

    def requeue_one(self, run: sweeps.Run, state: str | None) -> bool:
        """Deletes and re-creates the TPU of an unfinished run whose TPU was lost."""
        if state is None:
            print(f"# if {run.name}'s TPU is {'/'.join(sorted(REQUEUE_STATES))}:")
        elif state not in REQUEUE_STATES:
            return False
        elif is_finished(self.summary(run)) or self.failure(run):
            return False  # preempted after it finished, or given up: nothing left to do
        else:
            print(f"# {run.name}: TPU {state}, queued again")
        if state != "NOT_FOUND":
            self.delete(run)
        self.create(run)
        return True

    def watch(self) -> int:
        return Watch(self).loop()

    def down(self) -> int:
        return self.for_each_run(self.delete)


COMMANDS = ("up", "run", "status", "requeue", "watch", "down")
USAGE = (f"python -m launch.tpu {{{'|'.join(COMMANDS)}}} --sweep=NAME|PATH.py --bucket=gs://BUCKET "
         "--zone=ZONE [flags] [-- train flags]")
STARTS_RUNS = ("up", "requeue", "run", "watch")  # TPUs for runs, or the runs: the flagfile counts


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
    flags.DEFINE_string("python_version", PYTHON_VERSION, "Python X.Y of the workers' venv (3.12: "
                        "newer JAX and libtpu need it).", **fv)
    flags.DEFINE_float("log_copy_s", 120, "Copy each worker's log to <workdir>/logs/ this "
                       "often (and when the run ends).", **fv)
    flags.DEFINE_integer("gcloud_retries", 4, "Attempts after a transient gcloud failure.",
                         lower_bound=0, upper_bound=100, **fv)
    flags.DEFINE_float("retry_s", 15, "First wait before a retry; doubled each time.", **fv)
    flags.DEFINE_float("poll_s", 300, "watch: seconds between polls.", **fv)
    flags.DEFINE_integer("max_polls", 10_000, "watch: give up after N polls.", lower_bound=1,
                         **fv)
    flags.DEFINE_integer("max_restarts", 3, "watch: restarts of a run that died or stalled "
                         "before it is marked failed and its TPU deleted.", lower_bound=0,
                         **fv)
    flags.DEFINE_float("stall_s", 3600, "watch: a running run whose summary.json gains no step "
                       "for this long is stopped and restarted; keep it above the time between "
                       "checkpoints and the first compilation.", **fv)
    flags.DEFINE_boolean("keep_tpus", False, "watch: keep the TPU of a run that finished "
                         "(default: delete it, as it is billed until deleted).", **fv)
    checks.register_tpu_checks(values)


def parse_args(argv: Sequence[str]):
    """COMMAND first (or anywhere before a bare --), then flags."""
    args, positional = sweeps.parse_launcher_args(define_flags, argv, "launch.tpu", USAGE)
    if len(positional) != 1 or positional[0] not in COMMANDS:
        raise UsageError(f"give one command of {', '.join(COMMANDS)} (got "
                         f"{' '.join(positional) or 'none'}), e.g. python -m launch.tpu up "
                         "--sweep=depth_cell --bucket=gs://BUCKET --zone=ZONE")
    args.command = positional[0]
    checks.check_tpu_args(args)
    args.runtime_version = args.runtime_version or runtime_version_for(args.accelerator_type)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sweep = sweeps.select_runs(sweeps.load_sweep(args.sweep), args.runs, args.seeds)
    checks.check_sweep_name(args.sweep_name or sweep.name)
    if args.command in STARTS_RUNS:  # checked before any gcloud call; status and down need none
        flagfile = checks.flagfile_for_workers(sweep, packed=not args.repo_url)
        sweep = dataclasses.replace(sweep, base_flagfile=flagfile)
    return getattr(TpuLauncher(args, sweep), args.command)()


def entry_point() -> None:
    try:
        with exit_on_usage_error():
            sys.exit(main())
    except GcloudError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    entry_point()
