"""What launch.tpu runs on the TPU workers: shell scripts sent with `tpu-vm ssh --worker=all`
that install the code (this tree packed, or a git clone), start a run detached, probe whether it
still runs, and stop it.

Each worker keeps, per run, in ~/deeprnn-runs:

    <run>.lock   flock-ed by the run's processes while it runs (they inherit its descriptor,
                 so the lock lives as long as the training program, whatever happens to the
                 shell that started it): a second start never starts a second copy, and a
                 probe that can take the lock knows the run has stopped
    <run>.log    its output, appended across attempts, each opened by an ATTEMPT line
    <run>.exit   the exit status of the last attempt (absent while it runs, or after a kill)
    <run>.pgid   its process group, for `stop`

A worker's disk goes with its VM when a Spot TPU is preempted, so the log is also copied to
`<workdir>/logs/<hostname>.log` every `log_copy_s` seconds and when the run ends.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import tarfile
from dataclasses import dataclass

from launch.sweep import REPO_ROOT

REMOTE_CODE = "~/deeprnn"
REMOTE_RUNS = "~/deeprnn-runs"
REMOTE_PYTHON = "$HOME/venv/bin/python"
REMOTE_TARBALL = "deeprnn-src.tar.gz"  # in the home folder
PROBE_TAG = "deeprnn-probe"
ATTEMPT = "=== deeprnn attempt"
# A stopped run gets TERM first (the training program saves a checkpoint on it), KILL after this.
STOP_GRACE_S = 60


def _files(run: str) -> dict[str, str]:
    return {kind: f"{REMOTE_RUNS}/{run}.{kind}" for kind in ("lock", "log", "exit", "pgid")}


def source_files() -> list[str]:
    """The files of this working tree that pack_source ships (tracked and untracked ones, not
    ignored ones), relative to the repository, sorted."""
    try:  # read-only: which files git would ship, untracked ones included
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                                 cwd=REPO_ROOT, check=True, text=True, capture_output=True)
        files = [f for f in listing.stdout.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    return sorted(f for f in files if (REPO_ROOT / f).is_file())


def pack_source(path: pathlib.Path, dry_run: bool = False) -> None:
    """This working tree (source_files) as a .tar.gz."""
    files = source_files()
    if dry_run:
        print(f"# pack {len(files)} files of {REPO_ROOT} into {path}")
        return
    with tarfile.open(path, "w:gz") as tar:
        for file in files:
            tar.add(REPO_ROOT / file, arcname=file)


def clone_steps(repo_url: str, ref: str) -> list[str]:
    """The code from git. FETCH_HEAD is the ref as the remote has it now (a branch's newest
    commit, a tag, a commit), whatever was checked out before."""
    return [f"[ -d {REMOTE_CODE} ] || git clone -q {shlex.quote(repo_url)} {REMOTE_CODE}",
            f"cd {REMOTE_CODE}", f"git fetch -q origin {shlex.quote(ref)}",
            "git checkout -q --force --detach FETCH_HEAD"]


def unpack_steps() -> list[str]:
    """The code from the tarball copied to the worker (pack_source)."""
    return [f"rm -rf {REMOTE_CODE}", f"mkdir -p {REMOTE_CODE}",
            f"tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_CODE}", f"cd {REMOTE_CODE}"]


def install_script(run: str, python_version: str, fetch: list[str]) -> str:
    """Python `python_version` in ~/venv (made again if it holds another Python), the code in
    ~/deeprnn (by the `fetch` steps), installed with '.[tpu,gcs]'. A worker on which the run is
    still running keeps its code."""
    lock = _files(run)["lock"]
    steps = [
        "set -e",
        f"mkdir -p {REMOTE_RUNS}",
        f"exec 9>>{lock}",
        f'if ! flock -n 9; then echo "{run}: running, code left as is"; exit 0; fi',
        "python3 -m pip install -q --user uv",
        # A venv of another Python (an older launcher's, or another --python_version) is made
        # again: its packages would be resolved for that Python.
        f"{REMOTE_PYTHON} --version 2>&1 | grep -qF 'Python {python_version}.' || "
        f"~/.local/bin/uv venv -q --clear --python {python_version} $HOME/venv",
        # One command per step: `set -e` ignores a failure inside an && chain, which let a
        # failed fetch install the old checkout.
        *fetch,
        f'~/.local/bin/uv pip install -q --python {REMOTE_PYTHON} -e ".[tpu,gcs]"',
    ]
    return "; ".join(steps)


def start_script(run: str, commands: list[str], workdir: str, log_copy_s: float) -> str:
    """Runs `commands` (joined by &&) detached, under the run's lock, unless it already runs."""
    f = _files(run)
    remote_log = shlex.quote(f"{workdir}/logs/") + '"$(hostname)".log'
    inner = "; ".join([
        f"exec 9>>{f['lock']}",
        "flock -n 9 || exit 0",  # already running: leave it be
        f"rm -f {f['exit']}",
        f"echo $(ps -o pgid= $$) > {f['pgid']}",  # unquoted: the padding goes
        f'echo "{ATTEMPT} $(date -u +%FT%TZ) on $(hostname)"',
        f"copy_log() {{ gcloud storage cp {f['log']} {remote_log} >/dev/null 2>&1 || true; }}",
        # The copier closes the lock's descriptor: only the run itself may hold the lock.
        f"( exec 9>&-; while sleep {log_copy_s:g}; do copy_log; done ) & copier=$!",
        "set -o pipefail",
        " && ".join(commands),
        "status=$?",
        "kill $copier 2>/dev/null",
        f"echo $status > {f['exit']}",
        "copy_log",
        "exit $status",
    ])
    # Only the run goes to the background, with its own descriptors: `a && b &` would put the
    # whole list in a subshell holding ssh's output open, and ssh would wait for the run's end.
    return (f"mkdir -p {REMOTE_RUNS} && cd {REMOTE_CODE} && {{ setsid nohup bash -c "
            f"{shlex.quote(inner)} >> {f['log']} 2>&1 < /dev/null & }}")


def probe_script(run: str) -> str:
    """One line per worker: `deeprnn-probe HOST running`, or `deeprnn-probe HOST stopped STATUS
    LAST_ERROR` with STATUS the last attempt's exit status (`none` after a kill, or if it never
    ran) and LAST_ERROR that attempt's last `error:` line."""
    f = _files(run)
    last_error = (f"awk '/^{ATTEMPT}/ {{e = \"\"}} /^error: / {{e = $0}} END {{print e}}' "
                  f"{f['log']} 2>/dev/null")
    return (f"mkdir -p {REMOTE_RUNS}; if flock -n {f['lock']} true; then echo \"{PROBE_TAG} "
            f"$(hostname) stopped $(cat {f['exit']} 2>/dev/null || echo none) $({last_error})\"; "
            f"else echo \"{PROBE_TAG} $(hostname) running\"; fi")


def stop_script(run: str) -> str:
    """TERM to the run's process group, KILL after STOP_GRACE_S; nothing if it is not running.
    (A pod slice's stalled run may hang in a collective, where TERM alone would not end it.)"""
    f = _files(run)
    return (f"if ! flock -n {f['lock']} true && [ -s {f['pgid']} ]; then g=$(cat {f['pgid']}); "
            f"kill -TERM -- -$g 2>/dev/null; for i in $(seq {STOP_GRACE_S}); do "
            f"kill -0 -- -$g 2>/dev/null || break; sleep 1; done; kill -KILL -- -$g 2>/dev/null; "
            "fi; true")


@dataclass(frozen=True)
class WorkerState:
    host: str
    running: bool
    exit_status: int | None = None  # of the last attempt; None: killed, or it never ran
    error: str = ""  # the last attempt's last `error:` line


def parse_probe(output: str) -> list[WorkerState]:
    """The workers' answers to `probe_script`, in the order given (other lines are ignored:
    gcloud and ssh add their own)."""
    states = []
    for line in output.splitlines():
        words = line.strip().split(maxsplit=4)
        if len(words) < 3 or words[0] != PROBE_TAG:
            continue
        if words[2] == "running":
            states.append(WorkerState(words[1], True))
        else:
            status = words[3] if len(words) > 3 else "none"
            states.append(WorkerState(words[1], False,
                                      int(status) if status.lstrip("-").isdigit() else None,
                                      words[4] if len(words) > 4 else ""))
    return states
