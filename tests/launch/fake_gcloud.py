"""A stand-in for gcloud in the launcher tests, run as `gcloud` from the first folder on PATH.

It checks each subcommand's flags the way the real one needs them, keeps TPU states in files
under $FAKE_GCLOUD_STATE, records every call in calls.jsonl, and fails as gcloud does
(`ERROR: (gcloud.GROUP.COMMAND) CODE: message`, exit status 1). Files in the state folder:

    tpu-NAME        the TPU's state (ACTIVE once created)
    preempt-NAME    the TPU reads SUSPENDED once, until it is deleted and created again
    fail.json       [{"verb": "ssh", "code": 255, "stderr": "...", "times": 2, "match": "x"}]:
                    the next calls of that verb (create, ssh, storage-cat, ...) whose arguments
                    hold `match` fail so
    gcs/BUCKET/...  the objects of gs://BUCKET/... (storage cp, cat, rm)

With $FAKE_GCLOUD_WORKERS=N, `tpu-vm ssh --worker=all --command=C` runs C with bash on N fake
workers: each a HOME of its own (workers/NAME/I/), with hostname NAME-w-I, and fake_train.py as
its venv's python. An install command only sets the worker up (no pip, no network).
"""

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
args = sys.argv[1:]
state_dir = pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])
with open(state_dir / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
flags = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else True
         for a in args if a.startswith("--")}
words = [a for a in args if not a.startswith("--")]
command = "gcloud." + ".".join(words[:4] if words[0] == "compute" else words[:2])


def fail(code_and_message, code=1):
    print(f"ERROR: ({command}) {code_and_message}", file=sys.stderr)
    sys.exit(code)


def need(*names):
    missing = [n for n in names if n not in flags]
    if missing:
        fail(f"INVALID_ARGUMENT: missing {' '.join(missing)}", 2)


def injected_failure(verb):
    path = state_dir / "fail.json"
    plans = json.loads(path.read_text()) if path.exists() else []
    for plan in plans:
        if plan["verb"] == verb and plan["times"] > 0 and plan.get("match", "") in " ".join(args):
            plan["times"] -= 1
            path.write_text(json.dumps(plans))
            print(plan["stderr"], file=sys.stderr)
            sys.exit(plan["code"])


def tpu_file(name):
    return state_dir / f"tpu-{name}"


def gcs_path(url):
    return state_dir / "gcs" / url.removeprefix("gs://")


def worker_home(name, index):
    home = state_dir / "workers" / name / str(index)
    if not home.exists():  # what an install leaves: the code folder, the venv's python
        for folder in ("deeprnn", "venv/bin", "bin"):
            (home / folder).mkdir(parents=True, exist_ok=True)
        for path, body in ((home / "venv/bin/python",
                            f'exec {sys.executable} {HERE / "fake_train.py"} "$@"'),
                           (home / "bin/hostname", f"echo {name}-w-{index}")):
            path.write_text(f"#!/bin/sh\n{body}\n")
            path.chmod(0o755)
    return home


def on_workers(name, script):
    code = 0
    for index in range(int(os.environ.get("FAKE_GCLOUD_WORKERS", "0"))):
        home = worker_home(name, index)
        if "uv pip install" in script:
            continue
        env = dict(os.environ, HOME=str(home), PATH=f"{home / 'bin'}:{os.environ['PATH']}")
        done = subprocess.run(["bash", "-c", script], env=env, cwd=home, text=True,
                              capture_output=True, timeout=30)  # a start returns at once
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        code = code or done.returncode
    sys.exit(code)


verb = words[3] if words[0] == "compute" else f"storage-{words[1]}"
injected_failure(verb)
if words[:3] == ["compute", "tpus", "queued-resources"] or words[:4] in (
        ["compute", "tpus", "tpu-vm", "create"], ["compute", "tpus", "tpu-vm", "describe"],
        ["compute", "tpus", "tpu-vm", "delete"]):
    name = words[4]
    need("--zone")
    if verb == "create":
        need("--accelerator-type", "--scopes")
        if words[2] == "queued-resources":
            need("--node-id", "--runtime-version")
            if flags["--node-id"] != name:
                fail("INVALID_ARGUMENT: --node-id differs from the queued resource's name")
        else:
            need("--version")
        if tpu_file(name).exists():
            fail(f"ALREADY_EXISTS: Resource 'projects/p/locations/z/nodes/{name}' already exists")
        tpu_file(name).write_text("ACTIVE")
    elif verb == "describe":
        need("--format")
        if not tpu_file(name).exists():
            fail(f"NOT_FOUND: Resource 'projects/p/locations/z/nodes/{name}' was not found")
        state = tpu_file(name).read_text()
        preempt = state_dir / f"preempt-{name}"
        if preempt.exists():  # preempted once: SUSPENDED until deleted and created again
            preempt.unlink()
            state = "SUSPENDED"
            tpu_file(name).write_text(state)
        print(state)
    elif verb == "delete":
        need("--quiet", *(["--force"] if words[2] == "queued-resources" else []))
        if not tpu_file(name).exists():
            fail(f"NOT_FOUND: Resource 'projects/p/locations/z/nodes/{name}' was not found")
        tpu_file(name).unlink()
    else:
        fail(f"INVALID_ARGUMENT: unexpected {verb}", 2)
elif words[:3] == ["compute", "tpus", "tpu-vm"]:
    need("--zone", "--worker")
    if flags["--worker"] != "all":
        fail("INVALID_ARGUMENT: --worker must be all", 2)
    if verb == "ssh":
        need("--command")
        name = words[4]
        if not tpu_file(name).exists() or tpu_file(name).read_text() != "ACTIVE":
            fail(f"FAILED_PRECONDITION: {name} is not ACTIVE")
        on_workers(name, flags["--command"])
    elif verb == "scp":
        source, target = words[4], words[5]
        name = target.split(":")[0]
        if not (pathlib.Path(source).is_file() and tpu_file(name).read_text() == "ACTIVE"):
            fail("FAILED_PRECONDITION: scp needs a file and an ACTIVE TPU")
    else:
        fail(f"INVALID_ARGUMENT: unexpected {verb}", 2)
elif verb == "storage-cat":
    if not gcs_path(words[2]).is_file():
        fail(f"The following URLs matched no objects or files:\n-{words[2]}")
    print(gcs_path(words[2]).read_text(), end="")
elif verb == "storage-cp":
    source, target = words[2], gcs_path(words[3])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(sys.stdin.buffer.read() if source == "-" else
                       pathlib.Path(source).read_bytes())
elif verb == "storage-rm":
    gcs_path(words[2]).unlink()
else:
    fail(f"INVALID_ARGUMENT: unexpected command {' '.join(words)}", 2)
