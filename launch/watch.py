"""`python -m launch.tpu watch`: keep a sweep going until every run finished or failed.

Each poll takes each run on its own: a gcloud call that fails for one run (after the retries of
launch.gcloud) is reported and tried again at the next poll, and the other runs go on.

    its workdir holds launch_failed.json          failed before: left alone
    TPU lost (preempted, suspended, failed, gone) deleted and queued again, unless it finished
    TPU not ready (queued, provisioning)          wait
    TPU ready, run not started on it              install the code, start the run
    started: probe the workers (is the run's lock held? how did its last attempt end?)
      running, summary.json gaining steps         wait
      running, no new step for --stall_s          stop it on every worker, start it again
      stopped: finished, exit status 0            done; its TPU deleted (--keep_tpus keeps it)
      stopped: 75, a signal after a checkpoint    start it again (not counted)
      stopped: 2, bad input (flags, corpus, bucket access)   failed at once: a restart cannot help
      stopped otherwise (a crash, a kill)         start it again, at most --max_restarts times

A run given up gets `launch_failed.json` in its workdir (the reason: its last `error:` line or
how it died), and its TPU is deleted, which would otherwise be billed for nothing. The loop
ends when every run finished (0) or some failed (1), or after --max_polls polls (1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from deeprnn.errors import EXIT_USAGE
from deeprnn.run.lifecycle import EXIT_PREEMPTED
from deeprnn.run.summary import is_finished
from launch.gcloud import GcloudError

# A run started this recently that neither holds its lock nor left an exit status is taken to
# be still starting, not killed: the start is detached (setsid), and on a loaded machine its
# process took its lock after the next probe (seen once in the test suite).
START_GRACE_S = 30.0


@dataclass
class Tracked:
    """What the watch knows of one run between polls."""
    started: bool = False  # started (or found running) on its current TPU
    restarts: int = 0
    steps: int = -1  # steps_done when last seen
    progress_at: float = 0.0  # when `steps` last changed, or the run was (re)started
    started_at: float = 0.0  # when it was last (re)started
    failure_checked: bool = False
    outcome: str | None = None  # "finished" or "failed": nothing more to do


def steps_done(summary: dict | None) -> int:
    return int((summary or {}).get("steps_done", 0))


class Watch:
    def __init__(self, launcher, clock=time.monotonic, sleep=time.sleep):
        self.launcher, self.args = launcher, launcher.args
        self.runs = launcher.sweep.runs
        self.tracked = {run.name: Tracked() for run in self.runs}
        self.clock, self.sleep = clock, sleep

    def loop(self) -> int:
        if self.args.dry_run:
            self.show_one_round()
            return 0
        for _ in range(self.args.max_polls):
            for run in self.runs:
                tracked = self.tracked[run.name]
                if tracked.outcome:
                    continue
                try:
                    self.poll(run, tracked)
                except GcloudError as error:
                    print(f"# {run.name}: {error}; again at the next poll", flush=True)
            if all(t.outcome for t in self.tracked.values()):
                failed = [name for name, t in self.tracked.items() if t.outcome == "failed"]
                print(f"# every run ended: {len(self.runs) - len(failed)} finished, "
                      f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
                return 1 if failed else 0
            self.sleep(self.args.poll_s)
        going = [name for name, t in self.tracked.items() if not t.outcome]
        print(f"# stopped watching after --max_polls={self.args.max_polls} polls; not ended: "
              f"{', '.join(going)} (their TPUs are left as they are)")
        return 1

    def poll(self, run, t: Tracked) -> None:
        launcher, now = self.launcher, self.clock()
        if not t.failure_checked:  # only an earlier watch marks runs failed
            failure = launcher.failure(run)
            t.failure_checked = True
            if failure:
                print(f"# {run.name}: failed before ({failure.get('reason')}); left alone")
                t.outcome = "failed"
                return
        state = launcher.state(run)
        if launcher.lost(state):
            if is_finished(launcher.summary(run)):
                print(f"# {run.name}: finished (its TPU is {state})")
                t.outcome = "finished"
                return
            print(f"# {run.name}: TPU {state}, queued again")
            if state != "NOT_FOUND":
                launcher.delete(run)
            launcher.create(run)
            t.started = False
            return
        if not launcher.ready(state):
            return  # queued, provisioning, ...
        summary = launcher.summary(run)
        if not t.started:
            if is_finished(summary) and not any(w.running for w in launcher.probe(run)):
                self.finished(run, t)
                return
            launcher.install(run)  # leaves a running run's code alone
            launcher.start(run)  # and does not start a second copy
            t.started, t.steps, t.progress_at = True, steps_done(summary), now
            t.started_at = now
            return
        workers = launcher.probe(run)
        if not workers:
            return  # no worker answered: ask again at the next poll
        if any(w.running for w in workers):
            if steps_done(summary) != t.steps:
                t.steps, t.progress_at = steps_done(summary), now
            elif now - t.progress_at >= self.args.stall_s:
                print(f"# {run.name}: no new step in summary.json for {now - t.progress_at:.0f}"
                      f"s (at step {t.steps}); stopping it")
                launcher.stop(run)
                self.restart(run, t, f"stalled at step {t.steps}", now)
            return
        statuses = {w.exit_status for w in workers}
        if statuses == {None} and now - t.started_at < START_GRACE_S:
            return  # just started: its process may not hold its lock yet (a loaded worker)
        error = next((w.error for w in workers if w.error), "")
        if statuses == {0} and not is_finished(summary):
            # The summary was read before the probe: a run that finished in between wrote
            # its final summary after that read.
            summary = launcher.summary(run)
        if statuses == {0} and is_finished(summary):
            self.finished(run, t)
        elif statuses == {EXIT_PREEMPTED}:  # saved a checkpoint: resumes, not a failure
            print(f"# {run.name}: stopped by a signal after a checkpoint; starting it again")
            launcher.start(run)
            t.progress_at = t.started_at = now
        elif EXIT_USAGE in statuses:
            self.fail(run, t, error or f"bad input (exit status {EXIT_USAGE})")
        else:
            ended = ", ".join(sorted("killed" if s is None else f"exit status {s}"
                                     for s in statuses))
            self.restart(run, t, f"{error} ({ended})" if error else f"died ({ended})", now)

    def restart(self, run, t: Tracked, reason: str, now: float) -> None:
        if t.restarts >= self.args.max_restarts:
            self.fail(run, t, f"{reason}, after {t.restarts} restarts")
            return
        t.restarts += 1
        print(f"# {run.name}: {reason}; starting it again (restart {t.restarts} of "
              f"{self.args.max_restarts})")
        self.launcher.start(run)  # the code is on the workers already
        t.progress_at = t.started_at = now

    def fail(self, run, t: Tracked, reason: str) -> None:
        self.launcher.mark_failed(run, reason, t.restarts)
        t.outcome = "failed"

    def finished(self, run, t: Tracked) -> None:
        t.outcome = "finished"
        if self.args.keep_tpus:
            print(f"# {run.name}: finished; its TPU kept (--keep_tpus)")
        else:
            print(f"# {run.name}: finished; deleting its TPU")
            self.launcher.delete(run)

    def show_one_round(self) -> None:
        """A dry run: the commands of one poll, for each case."""
        launcher = self.launcher
        for run in self.runs:
            launcher.failure(run)
            launcher.state(run)
            launcher.summary(run)
            launcher.requeue_one(run, None)
            print(f"# if {run.name}'s TPU is ready and the run not started there:")
            launcher.install(run)
            launcher.start(run)
            print(f"# once started, each poll asks the workers whether {run.name} runs:")
            launcher.probe(run)
            print(f"# if it stalled for {self.args.stall_s:g}s: stop it, then start it again "
                  f"(at most {self.args.max_restarts} restarts); if it died: start it again")
            launcher.stop(run)
