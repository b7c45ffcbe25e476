"""The fake TPU workers' `python` (tests/launch/fake_gcloud.py): `-m deeprnn.train --workdir=W
...` acts out one attempt of the run named by W, `-m deeprnn.evaluate ... --output=U` writes a
result to U. gs:// paths are the fake gcloud's objects.

$FAKE_GCLOUD_STATE/behaviour/<run>.json lists what each attempt does (the last entry repeats),
counted per worker in ~/attempts-<run>:

    ok         writes a finished summary.json and exits 0 (the default)
    crash      a traceback, exit status 1
    bad        an `error:` line, exit status 2 (bad input)
    preempted  stopped by a signal after a checkpoint, exit status 75
    hang       writes summary.json at step 3, its pid to $FAKE_GCLOUD_STATE/hung-<run>, and
               never ends
    slow       prints a line every 50 ms until $FAKE_GCLOUD_STATE/release-<run> exists, then ok
"""

import json
import os
import pathlib
import sys
import time

state_dir = pathlib.Path(os.environ["FAKE_GCLOUD_STATE"])
module, options = sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)


def gcs(url: str) -> pathlib.Path:
    return state_dir / "gcs" / url.removeprefix("gs://")


def write(url: str, record: dict) -> None:
    gcs(url).parent.mkdir(parents=True, exist_ok=True)
    gcs(url).write_text(json.dumps(record))


workdir = options["--workdir"]
run = workdir.rstrip("/").rsplit("/", 1)[1]
if module == "deeprnn.evaluate":
    write(options["--output"], {"corpus": options["--corpus"], "perplexity": 2.0})
    sys.exit(0)
plan_file = state_dir / "behaviour" / f"{run}.json"
plan = json.loads(plan_file.read_text()) if plan_file.exists() else ["ok"]
counter = pathlib.Path.home() / f"attempts-{run}"
attempt = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(attempt + 1))
outcome = plan[min(attempt, len(plan) - 1)]
print(f"attempt {attempt}: {outcome}", flush=True)
if outcome == "crash":
    print("Traceback (most recent call last):\nRuntimeError: boom", flush=True)
    sys.exit(1)
if outcome == "bad":
    print("error: --lr must be a positive number, got -1.0; the book uses 2", flush=True)
    sys.exit(2)
if outcome == "preempted":
    print("stopped by SIGTERM after step 5 (checkpoint of step 5 saved)", flush=True)
    sys.exit(75)
if outcome == "hang":
    write(f"{workdir}/summary.json", {"steps_done": 3})
    (state_dir / f"hung-{run}").write_text(str(os.getpid()))
    time.sleep(600)
if outcome == "slow":
    step = 0
    while not (state_dir / f"release-{run}").exists():
        step += 1
        print(f"step {step}", flush=True)
        time.sleep(0.05)
write(f"{workdir}/summary.json", {"steps_done": 10, "finished": True})
print("training finished", flush=True)
