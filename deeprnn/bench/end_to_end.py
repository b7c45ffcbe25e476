"""The book's recipe end to end: deeprnn's training program against d2l's train_ch8 in PyTorch.

    python -m deeprnn.bench --e2e=PATH/time_machine.txt [--e2e_epochs=500] [--json=FILE]

Three processes, each timed from launch to exit (interpreter start, imports, compilation and
every epoch included), so all three are measured alike:
- deeprnn, cold: `python -m deeprnn.train --flagfile=experiments/d2l_lstm.flags` with an empty
  JAX compilation cache (a fresh folder);
- deeprnn, warm: the same command again, reading the cache the cold run filled;
- PyTorch: `python -m deeprnn.bench.torch_peers` (d2l's train_ch8: sequential batches, a host sync
  and a Python clipping loop per batch, a greedy sample every 10 epochs).
Both train on the same 10,000 characters (d2l 0.17's loader); the train perplexity of each is
reported as the proof that they did the same job. The deeprnn runs pass --notensorboard, so the
comparison also runs where tensorboardX is absent (the lent GPU machines).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from deeprnn.errors import UsageError
from deeprnn.run.summary import read_summary

RECIPE = "experiments/d2l_lstm.flags"


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {last}")
    return wall, proc


def check_inputs(text_path: str, flagfile: str) -> pathlib.Path:
    text = pathlib.Path(text_path)
    if text.name != "time_machine.txt" or not text.is_file():
        raise UsageError(f"--e2e={text_path} is not a file named time_machine.txt: give the "
                         "mirror's copy, e.g. --e2e=../shared/corpora/time_machine.txt")
    if not pathlib.Path(flagfile).is_file():
        raise UsageError(f"the recipe {flagfile} is not there: run the benchmark from the "
                         "repository root, or pass --e2e_flagfile")
    return text


def run_end_to_end(text_path: str, *, epochs: int, flagfile: str = RECIPE,
                   torch_threads: int = 0, on_row=None) -> list[dict]:
    """Rows {implementation, config, device, wall_s, epochs, train_perplexity, speedup_vs_torch}
    in the order deeprnn cold, deeprnn warm, PyTorch; on_row(rows) after each (to save them).
    A side that fails is reported on stderr and left out; the others are kept. The speed-up is
    left out (None) when the flagfile is not the book's recipe, which is what PyTorch runs.

    This process does not start JAX: on a GPU, a backend here would hold device memory while
    the timed processes run. Each row's device comes from the process that ran it.
    """
    text = check_inputs(text_path, flagfile)
    rows = []

    def add(row):
        rows.append(row)
        _print(row)

    def save():  # outside each side's try: a failed write is not that side's failure
        if on_row is not None:
            on_row(rows)

    with tempfile.TemporaryDirectory(prefix="deeprnn-e2e-") as tmp:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache")}
        for label in ("cold", "warm"):
            workdir = os.path.join(tmp, label)
            cmd = [sys.executable, "-m", "deeprnn.train", f"--flagfile={flagfile}",
                   f"--workdir={workdir}", f"--data_dir={text.parent}",
                   f"--num_epochs={epochs}", "--notensorboard"]
            try:
                wall, _ = _timed(cmd, env)
                summary = read_summary(workdir)
                add({"implementation": f"deeprnn ({label} compile cache)",
                     "device": " ".join(summary.get("devices", ["?"])[0].split()[1:]),
                     "wall_s": wall, "epochs": epochs,
                     "train_perplexity": summary["last"].get("train/perplexity"),
                     "impl": summary.get("flags", {}).get("impl"),
                     # inside the wall time: data, model, compilation and the first call
                     "startup_s": summary.get("startup_s"),
                     "first_call_s": summary.get("first_call_s")})
            except Exception as err:  # one failing side must not lose the others
                print(f"deeprnn {label}: failed: {type(err).__name__}: {err}", file=sys.stderr,
                      flush=True)
            save()
        cmd = [sys.executable, "-m", "deeprnn.bench.torch_peers", f"--text={text}",
               f"--epochs={epochs}", f"--threads={torch_threads}"]
        try:
            wall, proc = _timed(cmd, dict(os.environ))
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            add({"implementation": "torch-d2l-train_ch8", "wall_s": wall, "epochs": epochs,
                 "train_perplexity": result["train_perplexity"], "device": result["device"],
                 "sample": result["sample"]})
        except Exception as err:
            print(f"torch: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        save()
    torch_wall = next((r["wall_s"] for r in rows if r["implementation"].startswith("torch")),
                      None)
    same_recipe = pathlib.Path(flagfile).resolve() == pathlib.Path(RECIPE).resolve()
    for row in rows:
        row["config"] = "d2l_lstm recipe" if same_recipe else f"{flagfile} (deeprnn only)"
        row["speedup_vs_torch"] = (torch_wall / row["wall_s"]
                                   if torch_wall is not None and same_recipe else None)
    save()
    return rows


def _perplexity(row) -> str:
    value = row["train_perplexity"]
    return "-" if value is None else f"{value:.2f}"


def _print(row) -> None:
    print(f"  {row['implementation']}: {row['wall_s']:.1f} s for {row['epochs']} epochs on "
          f"{row['device']}, train perplexity {_perplexity(row)}", flush=True)


def format_table(rows) -> str:
    """The rows; `first call s` is deeprnn's first compiled call (compilation or a cache read,
    and its steps), part of the wall time."""
    lines = [f"{'implementation':30} {'wall s':>8} {'first call s':>13} "
             f"{'speed-up vs torch':>18} {'train ppl':>10}", "-" * 83]
    for row in rows:
        speedup, first = row["speedup_vs_torch"], row.get("first_call_s")
        lines.append(f"{row['implementation']:30} {row['wall_s']:8.1f} "
                     f"{'-' if first is None else f'{first:.1f}':>13} "
                     f"{'-' if speedup is None else f'{speedup:.2f}x':>18} "
                     f"{_perplexity(row):>10}")
    return "\n".join(lines)
