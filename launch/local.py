"""Run a sweep on this machine: one run after another, or one run per local GPU.

    python -m launch.local --sweep=depth_cell --sweep_dir=/tmp/depth_cell \
        [--data_dir=../shared/corpora] [--runs='lstm_*'] [--seeds=0,1,2] \
        [--parallel_gpus=8 [--gpus_per_run=1]] [--dry_run] [-- --num_train_steps=100]

Each run trains in SWEEP_DIR/<run> (its output appended to train.log there); runs whose
summary.json says they finished are skipped, an unfinished one resumes from its newest
checkpoint. After training, each corpus in the run's `eval_corpora` is scored with
`python -m deeprnn.evaluate`. Commands run from the repository root, where the flagfile paths
point.
"""

import os
import pathlib
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from absl import flags

from deeprnn.errors import UsageError, exit_on_usage_error
from deeprnn.run.lifecycle import EXIT_PREEMPTED
from deeprnn.run.summary import is_finished, summary_if_any
from launch import checks
from launch import sweep as sweeps


@dataclass
class Job:
    run: sweeps.Run
    workdir: pathlib.Path
    train: list[str] | None  # None: already finished
    evaluations: list[tuple[list[str], pathlib.Path]]  # command, where its JSON result goes
    replace: bool = False  # finished, and --rerun_finished: train again in a fresh workdir


def plan_jobs(sweep: sweeps.Sweep, sweep_dir: pathlib.Path, args) -> list[Job]:
    python = shlex.split(args.python)
    jobs = []
    for run in sweep.runs:
        workdir = sweep_dir / run.name
        finished = is_finished(summary_if_any(str(workdir)))
        train = None
        if not finished or args.rerun_finished:
            flags = sweeps.train_args(
                sweep, run, str(workdir), data_dir=args.data_dir, extra_flags=args.extra_flags
            )
            train = [*python, "-m", args.train_module, *flags]
        evaluations = []
        for corpus in run.eval_corpora:
            result = workdir / sweeps.eval_result_name(corpus)
            if train is None and result.exists():
                continue  # scored before, and the model has not changed since
            flags = sweeps.evaluate_args(str(workdir), corpus, data_dir=args.data_dir)
            evaluations.append(([*python, "-m", args.evaluate_module, *flags], result))
        jobs.append(Job(run, workdir, train, evaluations, replace=finished and train is not None))
    return jobs


def replaced_dir(job: Job) -> pathlib.Path:
    """Where --rerun_finished moves a finished run before training it again: out of the
    sweep's run folders (the report reads SWEEP_DIR/*/summary.json), and nothing deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return job.workdir.parent / ".replaced" / f"{job.workdir.name}-{stamp}"


def device_slots(parallel_gpus: int, gpus_per_run: int) -> list[dict]:
    """One environment per concurrent run; no GPUs asked for means one run at a time."""
    if parallel_gpus < 0:
        raise UsageError(f"--parallel_gpus={parallel_gpus} must be 0 (one run at a time) or more")
    if gpus_per_run < 1:
        raise UsageError(f"--gpus_per_run={gpus_per_run} must be at least 1; give the GPUs each "
                         "run sees")
    if parallel_gpus == 0:
        return [{}]
    if parallel_gpus % gpus_per_run:
        raise UsageError(
            f"--parallel_gpus={parallel_gpus} is not a multiple of --gpus_per_run={gpus_per_run}"
        )
    slots = []
    for first in range(0, parallel_gpus, gpus_per_run):
        devices = ",".join(str(d) for d in range(first, first + gpus_per_run))
        slots.append({"CUDA_VISIBLE_DEVICES": devices})
    return slots


class Runner:
    """Runs jobs on device slots, one thread per slot, and prints one line per event."""

    def __init__(self, jobs: list[Job], slots: list[dict]):
        self.jobs, self.slots = jobs, slots
        self.lock = threading.Lock()
        self.failed: list[str] = []
        self.done = 0
        # Set by Ctrl-C or a run stopped by a signal: runs under way finish their checkpoint,
        # and no new one starts.
        self.stopping = threading.Event()

    def say(self, message: str) -> None:
        with self.lock:
            print(message, flush=True)

    def run_all(self) -> int:
        pending = queue.Queue()
        for index, job in enumerate(self.jobs, 1):
            pending.put((index, job))
        threads = [
            threading.Thread(target=self._work, args=(pending, slot)) for slot in self.slots
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:  # the runs got the same SIGINT and are saving a checkpoint
            self.stopping.set()
            self.say("stopping: no new run starts; the runs under way save a checkpoint")
            for thread in threads:
                thread.join()
        if self.stopping.is_set():
            left = len(self.jobs) - len(self.failed) - self.done
            self.say(f"stopped; run the same command again to resume ({left} runs not started)")
            return EXIT_PREEMPTED  # as a run stopped by a signal: run again to resume
        if self.failed:
            failed = ", ".join(self.failed)
            self.say(f"{len(self.failed)} of {len(self.jobs)} runs failed: {failed}")
            return 1
        self.say(f"all {len(self.jobs)} runs finished")
        return 0

    def _work(self, pending: queue.Queue, slot: dict) -> None:
        while not self.stopping.is_set():
            try:
                index, job = pending.get_nowait()
            except queue.Empty:
                return
            tag = f"[{index}/{len(self.jobs)}] {job.run.name}"
            try:
                ok = self._run_job(tag, job, slot)
            except OSError as error:  # e.g. --python names no program: this run fails, not all
                self.say(f"{tag}: FAILED: {error}")
                ok = False
            with self.lock:
                if ok:
                    self.done += 1
                else:
                    self.failed.append(job.run.name)

    def _run_job(self, tag: str, job: Job, slot: dict) -> bool:
        env = {**os.environ, **slot}
        where = f" on GPU {slot['CUDA_VISIBLE_DEVICES']}" if slot else ""
        if job.replace and job.workdir.exists():
            moved = replaced_dir(job)
            moved.parent.mkdir(parents=True, exist_ok=True)
            job.workdir.rename(moved)
            self.say(f"{tag}: finished before; moved to {moved} to train it again")
        job.workdir.mkdir(parents=True, exist_ok=True)
        if job.train is None:
            self.say(f"{tag}: finished before, skipped")
        else:
            self.say(f"{tag}: training{where} (log: {job.workdir / 'train.log'})")
            start = time.monotonic()
            with open(job.workdir / "train.log", "a") as log:
                code = subprocess.call(
                    job.train, cwd=sweeps.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            if code == EXIT_PREEMPTED:  # checkpointed; rerunning resumes
                self.stopping.set()
                self.say(f"{tag}: stopped by a signal after a checkpoint; run the sweep again "
                         "to resume")
                return False
            if code != 0:
                self.say(f"{tag}: FAILED with exit code {code}; see {job.workdir / 'train.log'}")
                return False
            self.say(f"{tag}: trained in {time.monotonic() - start:.1f}s")
        ok = True
        for command, result_path in job.evaluations:  # each corpus scored even if one fails
            corpus = next(a.split("=", 1)[1] for a in command if a.startswith("--corpus="))
            self.say(f"{tag}: evaluating on {corpus}")
            result_path.parent.mkdir(parents=True, exist_ok=True)
            partial = result_path.with_suffix(".json.partial")
            log_path = result_path.with_suffix(".log")
            with open(partial, "w") as result, open(log_path, "w") as log:
                code = subprocess.call(
                    command, cwd=sweeps.REPO_ROOT, env=env, stdout=result, stderr=log
                )
            if code != 0:
                partial.unlink()
                self.say(f"{tag}: evaluation on {corpus} FAILED ({code}); see {log_path}")
                ok = False
                continue
            partial.replace(result_path)  # present only once the evaluation completed
            self.say(f"{tag}: evaluation on {corpus} -> {result_path}")
        return ok


def print_dry_run(jobs: list[Job], slots: list[dict]) -> None:
    print(f"cd {sweeps.REPO_ROOT}")
    for index, job in enumerate(jobs):
        slot = slots[index % len(slots)]  # the first pass of the scheduler, for illustration
        if job.train is None:
            print(f"# {job.run.name}: finished before, skipped")
        else:
            if job.replace:
                print(f"# {job.run.name}: finished before; moved to "
                      f"{replaced_dir(job)} first")
            print(sweeps.shell_join(job.train, slot))
        for command, _ in job.evaluations:
            print(sweeps.shell_join(command, slot))


def define_flags(values: flags.FlagValues) -> None:
    fv = {"flag_values": values}
    sweeps.define_sweep_flags(values)
    flags.DEFINE_string("sweep_dir", None, "Runs go to SWEEP_DIR/<run>.", **fv)
    flags.DEFINE_integer("parallel_gpus", 0, "Local GPUs to spread runs over (0: one run at a "
                         "time, any device).", **fv)
    flags.DEFINE_integer("gpus_per_run", 1, "GPUs each run sees.", **fv)
    flags.DEFINE_boolean("rerun_finished", False, "Also start runs whose summary.json says "
                         "they finished.", **fv)
    flags.DEFINE_string("python", sys.executable, "Interpreter command.", **fv)
    flags.DEFINE_string("train_module", "deeprnn.train", "Training program.", **fv)
    flags.DEFINE_string("evaluate_module", "deeprnn.evaluate", "Evaluation program.", **fv)


def parse_args(argv: Sequence[str]):
    args, positional = sweeps.parse_launcher_args(
        define_flags, argv, "launch.local",
        "python -m launch.local --sweep=NAME|PATH.py --sweep_dir=DIR [flags] [-- train flags]")
    if positional:
        raise UsageError(f"unexpected arguments {positional}; give train flags after a bare --")
    if not args.sweep_dir:
        raise UsageError("--sweep_dir is required: runs go to SWEEP_DIR/<run>")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sweep = sweeps.select_runs(sweeps.load_sweep(args.sweep), args.runs, args.seeds)
    sweep_dir = pathlib.Path(args.sweep_dir).absolute()
    if args.data_dir and "://" not in args.data_dir:  # the runs' working folder is the repo's
        args.data_dir = str(pathlib.Path(args.data_dir).absolute())
    slots = device_slots(args.parallel_gpus, args.gpus_per_run)
    checks.existing_flagfile(sweep)
    checks.check_local_dirs(sweep_dir, args.data_dir)
    jobs = plan_jobs(sweep, sweep_dir, args)
    if args.dry_run:
        print_dry_run(jobs, slots)
        return 0
    print(f"sweep {sweep.name}: {len(jobs)} runs in {sweep_dir}, {len(slots)} at a time")
    code = Runner(jobs, slots).run_all()
    print(f"compare: tensorboard --logdir={sweep_dir}   report: "
          f"python -m deeprnn.report --sweep_dir={sweep_dir}")
    return code


def entry_point() -> None:
    with exit_on_usage_error():
        sys.exit(main())


if __name__ == "__main__":
    entry_point()
