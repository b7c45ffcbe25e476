"""`--profile=DIR`: a trace of every row's timed steps, and the table of its top device ops.

Each row runs one more repeat of its timed steps under a profiler: jax.profiler for the JAX
rows (DIR/<config>/<implementation>/plugins/profile/<run>/*.trace.json.gz and *.xplane.pb, for
TensorBoard's profile tab or Perfetto), torch.profiler for the torch rows (DIR/.../trace.json).
The table is read back from that trace: per op, how often it ran per step, its time per step and
its share of the step (the wall time of the profiled repeat over its steps). The remainder is
what no device op covers: dispatch, host work, waiting.

Which trace events are device ops:
- GPU and TPU (a `/device:` process): the events of its "XLA Ops" threads where there are any
  (TPU), else of every stream thread (GPU kernels), named by their `hlo_op` argument when they
  carry one, else by the kernel's name. Under XLA:GPU command buffers a kernel may carry no
  `hlo_op` (xprof issue 3070), so GPU tables can show kernel names.
- CPU (the `/host:CPU` process): the events that carry an `hlo_op` argument, i.e. the thunks
  XLA:CPU runs (fusions, dots, while loops, custom calls).
- torch.profiler traces: the CUDA kernels (category "kernel") where there are any, else the
  aten operators (category "cpu_op", which nest: each counts its own time).
An op's time is its own time: the time of op events nested inside it (a while loop's body on
the same thread) is counted for them, not twice. Everything else in the trace (Python, PjRt,
thread pools) is left out. Ops that run at once on several threads (XLA:CPU runs independent
thunks concurrently) can add up to more than the step, and "(no device op)" then goes negative.
For the JAX rows each op is described from the compiled HLO: its result shape and the JAX
operation it came from (`op_name` metadata, e.g. `transpose(jvp(...))/tbh,tbg->hg/dot_general`
is a backward einsum), so that an anonymous `ynn_fusion.14` reads as the weight gradient.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

import jax

TOP = 15


def profile_row(time_repeat, directory: pathlib.Path, steps: int, torch_row: bool,
                compiled_hlo=None) -> dict:
    """One more repeat of a row under the profiler; returns {trace, ms_per_step, ops}, where
    ms_per_step is the profiled repeat's (the profiler's overhead included). compiled_hlo()
    gives the row's compiled HLO text, to describe the ops (JAX rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    # The step time is the repeat's own (time_repeat returns seconds per step), not the
    # profiler's start and stop, which take longer than a small config's steps.
    if torch_row:
        from deeprnn.bench import torch_peers  # deferred: torch is optional (the [bench] extra)

        seconds = []
        trace = torch_peers.profile_steps(lambda: seconds.append(time_repeat()), directory)
        ms_per_step = 1e3 * seconds[0]
    else:
        with jax.profiler.trace(str(directory)):
            ms_per_step = 1e3 * time_repeat()
        trace = newest_trace(directory)
    ops = top_ops(read_events(trace), steps, ms_per_step)
    described = describe_ops(compiled_hlo()) if compiled_hlo else {}
    for op in ops:
        if op["name"] in described:
            op["hlo"] = described[op["name"]]
    return {"trace": str(trace), "ms_per_step": ms_per_step, "ops": ops}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>\([^)]*\)|\S+) "
                          r"(?P<opcode>[\w\-]+)\((?P<rest>.*)$")


def describe_ops(hlo_text: str) -> dict[str, str]:
    """{instruction name: "shape opcode  jax op"} for the instructions of compiled HLO text."""
    described = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shape = re.sub(r"\{[^}]*\}", "", match["shape"])  # drop layouts
        op_name = re.search(r'op_name="([^"]*)"', match["rest"])
        source = ""
        if op_name:
            parts = op_name[1].split("/")
            backward = " (bwd)" if any(p.startswith("transpose(") for p in parts) else ""
            source = "/".join(parts[-2:]) + backward
        described[match["name"]] = f"{shape} {match['opcode']}  {source}".rstrip()
    return described


def newest_trace(directory: pathlib.Path) -> pathlib.Path:
    traces = sorted(directory.glob("plugins/profile/*/*.trace.json.gz"),
                    key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"jax.profiler wrote no *.trace.json.gz under {directory}")
    return traces[-1]


def read_events(path: pathlib.Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_op_events(events: list[dict]) -> list[tuple[str, int, int, float, float]]:
    """(op name, pid, tid, start us, duration us) of the device-op events (module docstring)."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    xla_ops = {key for key, name in threads.items() if key[0] in devices and name == "XLA Ops"}
    ops = []
    categories = {e.get("cat") for e in events}
    torch_category = ("kernel" if "kernel" in categories else
                      "cpu_op" if "cpu_op" in categories else None)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        key, args = (e.get("pid"), e.get("tid")), e.get("args") or {}
        if torch_category is not None:
            wanted = e.get("cat") == torch_category
        elif devices:  # a GPU/TPU trace: the host's events (launches) are not the ops
            wanted = key[0] in devices and (
                key in xla_ops if any(k[0] == key[0] for k in xla_ops)
                else threads.get(key, "").startswith("Stream"))
        else:
            wanted = "hlo_op" in args
        if wanted:
            ops.append((args.get("hlo_op", e["name"]), key[0], key[1], float(e["ts"]),
                        float(e["dur"])))
    return ops


def self_times(ops) -> list[tuple[str, float]]:
    """(name, own duration in us): each op event less the op events nested inside it."""
    out = []
    by_thread = collections.defaultdict(list)
    for name, pid, tid, start, dur in ops:
        by_thread[(pid, tid)].append((start, -dur, name))
    for items in by_thread.values():
        items.sort()
        stack = []  # [end, name, own time]
        for start, neg_dur, name in items:
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                out.append((done[1], done[2]))
            if stack:
                stack[-1][2] += neg_dur  # the child's time is not the parent's own
            stack.append([start - neg_dur, name, -neg_dur])
        out += [(name, own) for _, name, own in stack]
    return out


def top_ops(events, steps: int, ms_per_step: float, top: int = TOP) -> list[dict]:
    """[{name, count, ms, share}] per step, largest first; then "(other ops)" for the rest
    and "(no device op)" for the step time that no op covers."""
    totals, counts = collections.Counter(), collections.Counter()
    for name, own in self_times(device_op_events(events)):
        totals[name] += own / 1e3 / steps
        counts[name] += 1
    rows = [{"name": name, "count": counts[name] / steps, "ms": ms,
             "share": ms / ms_per_step} for name, ms in totals.most_common()]
    shown, rest = rows[:top], rows[top:]
    if rest:
        ms = sum(r["ms"] for r in rest)
        shown.append({"name": f"(other ops: {len(rest)})", "count": sum(r["count"] for r in rest),
                      "ms": ms, "share": ms / ms_per_step})
    idle = ms_per_step - sum(totals.values())
    shown.append({"name": "(no device op)", "count": None, "ms": idle,
                  "share": idle / ms_per_step})
    return shown


def format_ops(label: str, profile: dict) -> str:
    lines = [f"{label}: top device ops per step ({profile['ms_per_step']:.2f} ms/step profiled; "
             f"trace {profile['trace']})",
             f"  {'op':36} {'count':>7} {'ms':>8} {'share':>7}  what (HLO)"]
    for op in profile["ops"]:
        count = "-" if op["count"] is None else f"{op['count']:.3g}"
        lines.append(f"  {_short(op['name'], 36):36} {count:>7} {op['ms']:8.2f} "
                     f"{100 * op['share']:6.1f}%  {_short(op.get('hlo', ''), 70)}")
    return "\n".join(lines)


def _short(name: str, width: int = 44) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def row_directory(root: str, config: str, implementation: str) -> pathlib.Path:
    """DIR/<config>/<implementation>, the implementation made safe as a folder name."""
    return pathlib.Path(root) / config / re.sub(r"[^A-Za-z0-9_.-]+", "_", implementation)
