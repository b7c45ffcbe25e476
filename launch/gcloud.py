"""The one door to gcloud for launch.tpu: every call printed, a dry run that runs none, and
failures sorted into what waiting cures and what it does not.

A sweep's `watch` runs for days against an API and VMs that fail in passing: ssh to a TPU that
is ACTIVE but not yet accepting connections, a 503, a delete refused while the queued resource
is SUSPENDING. Those are retried with exponential backoff. ALREADY_EXISTS on a create (a second
`up`) and NOT_FOUND on a delete mean the work is done, and callers accept them as such. Anything
else (permission denied, a bad flag) is raised at once as GcloudError: retrying cannot help.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from deeprnn.errors import UsageError
from launch.sweep import shell_join

# gcloud prints API errors as `ERROR: (gcloud.GROUP.COMMAND) CODE: message`, with the canonical
# codes of google.rpc.Code (cloud.google.com/apis/design/errors).
ALREADY_EXISTS, NOT_FOUND = "already_exists", "not_found"
_KINDS = (
    (ALREADY_EXISTS, re.compile(r"ALREADY_EXISTS|already exists", re.IGNORECASE)),
    (NOT_FOUND, re.compile(r"NOT_FOUND|not found|matched no objects", re.IGNORECASE)),
)
# Conditions that pass: overload, an operation still under way on the resource, dropped or
# refused connections (a VM still booting), rate limits.
_TRANSIENT_CODES = re.compile(r"\b(?:UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|"
                              r"RESOURCE_EXHAUSTED|FAILED_PRECONDITION|429|500|502|503|504)\b")
_TRANSIENT_WORDS = re.compile(r"try again|timed? ?out|connection (?:refused|reset|closed)|"
                              r"no route to host|broken pipe|kex_exchange_identification",
                              re.IGNORECASE)
SSH_FAILED = 255  # ssh's own exit status: the connection, not the remote command, failed


class GcloudError(Exception):
    """A gcloud call that failed for good; one line names it, its exit code and gcloud's
    last line of explanation."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str):
        self.args_, self.returncode, self.stderr = list(args), returncode, stderr
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        super().__init__(f"{shell_join(['gcloud', *args])} failed with exit code {returncode}"
                         + (f": {lines[-1].strip()}" if lines else ""))


def failure_kind(returncode: int, stderr: str, *, ssh: bool = False) -> str:
    """ALREADY_EXISTS, NOT_FOUND, "transient" (worth waiting for) or "fatal"."""
    if ssh and returncode == SSH_FAILED:  # ssh relays the workers' own stderr, which may say
        return "transient"                # "not found" about anything: the exit status decides
    for kind, pattern in _KINDS:
        if pattern.search(stderr):
            return kind
    if (_TRANSIENT_CODES.search(stderr)
            or _TRANSIENT_WORDS.search(stderr)):
        return "transient"
    return "fatal"


class Gcloud:
    """Runs `gcloud ARGS` (the first gcloud on PATH; the tests put a fake one there).

    retries: extra attempts for transient failures, after backoff_s, 2 * backoff_s, ...
    (capped at 5 minutes). `sleep` is injectable so that tests need not wait.
    """

    def __init__(self, dry_run: bool, retries: int = 4, backoff_s: float = 15.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.dry_run, self.retries, self.backoff_s, self.sleep = dry_run, retries, backoff_s, sleep

    def __call__(self, args: Sequence[str], *, capture: bool = False, accept: Sequence[str] = (),
                 stdin: str | None = None) -> subprocess.CompletedProcess | None:
        """The finished call (None in a dry run). `accept`: failure kinds that count as done
        (e.g. ALREADY_EXISTS for a create); `capture`: keep stdout (queries) instead of showing
        it. Raises GcloudError for any other failure, after the retries for transient ones."""
        command = ["gcloud", *args]
        if self.dry_run:
            print(shell_join(command), flush=True)
            return None
        if not capture:  # queries (describe, cat) stay quiet; actions are echoed as they run
            print("+ " + shell_join(command), flush=True)
        for attempt in range(self.retries + 1):
            try:
                result = subprocess.run(command, text=True, input=stdin, stderr=subprocess.PIPE,
                                        stdout=subprocess.PIPE if capture else None)
            except FileNotFoundError as error:
                raise UsageError("gcloud is not on PATH; install the Google Cloud CLI and run "
                                 "`gcloud auth login`") from error
            if not capture and result.stderr:  # kept for the verdict below, shown all the same
                print(result.stderr, end="", file=sys.stderr, flush=True)
            if result.returncode == 0:
                return result
            kind = failure_kind(result.returncode, result.stderr, ssh="ssh" in args[:4])
            if kind in accept:
                return result
            if kind != "transient" or attempt == self.retries:
                raise GcloudError(args, result.returncode, result.stderr)
            wait = min(self.backoff_s * 2 ** attempt, 300.0)
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            print(f"# gcloud {' '.join(args[:4])}: {last.strip()} (exit {result.returncode}); "
                  f"again in {wait:g}s", file=sys.stderr, flush=True)
            self.sleep(wait)
        raise AssertionError("unreachable")
