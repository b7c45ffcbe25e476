"""A sweep's results (`python -m deeprnn.report`): one table and its plots from the run folders.

Reads every run folder under DIR (a folder holding summary.json; metrics.jsonl and the
launcher's eval/*.json beside it) and writes report.md and PNG plots to --out (default: DIR),
and prints the Markdown. The plots: training_perplexity.png always; validation_perplexity.png
when runs have a validation split; perplexity_vs_depth.png when --num_layers varies;
perplexity_per_corpus.png when the training corpus varies. Runs that differ only in --seed
(and bookkeeping flags such as --workdir) share one table row: mean ± sample standard
deviation over them, or over the `seeds` of one run trained with --num_seeds. Local folders and
gs:// URLs both work.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field

from etils import epath

from deeprnn.errors import UsageError
from deeprnn.run.outputs import check_output_folder
from deeprnn.run.summary import REWRITE, SUMMARY_FILE, UnreadableSummary, read_summary
from deeprnn.run.writers import read_metrics

# Flags that say where or how often, not what is trained: runs differing only in these (and
# the seed) are repeats of one experiment.
BOOKKEEPING_FLAGS = frozenset({
    "seed", "workdir", "data_dir", "tfds_data_dir", "log_every", "sample_every",
    "checkpoint_every", "max_to_keep", "profile_steps", "sample_prefix", "sample_length",
    "num_seeds",
})
FINAL_METRICS = ("train/perplexity", "validation/perplexity", "validation/bits_per_char",
                 "test/perplexity", "test/bits_per_char")
TABLE_COLUMNS = (("train/perplexity", "train ppl", 3), ("validation/perplexity", "val ppl", 2),
                 ("validation/bits_per_char", "val bpc", 3), ("test/perplexity", "test ppl", 2),
                 ("test/bits_per_char", "test bpc", 3))
SPREAD_NOTE = ("**Bold**: the lowest mean of its column. ≈: not told apart from the bold value "
               "by the spread: the two means differ by no more than the sum of their sample "
               "standard deviations, or one of them has a single seed; the table does not "
               "support a difference there.")


@dataclass
class RunResult:
    name: str  # the run folder's path below the sweep folder
    summary: dict
    metrics: list[dict]
    evaluations: list[dict]  # what `deeprnn.evaluate` printed, one dict per other corpus

    @property
    def flags(self) -> dict:
        return self.summary.get("flags", {})

    def final_per_seed(self) -> list[dict]:
        """One dict of final metrics per independently seeded model this run trained, with
        its last logged training perplexity (the only score of a run without a held-out
        split, such as the book's recipe)."""
        seeds = self.summary.get("seeds") or []
        count = int(self.flags.get("num_seeds") or 1)
        if seeds:
            per_seed = [dict(s) for s in seeds]
        elif count > 1:  # a --num_seeds run without a held-out split keeps no per-seed finals
            per_seed = [{} for _ in range(count)]
        else:
            per_seed = [dict(self.summary.get("final") or {})]
        last = self.summary.get("last") or {}
        for k, scores in enumerate(per_seed):
            tag = "train/perplexity" if len(per_seed) == 1 else f"seed_{k}/train/perplexity"
            if isinstance(last.get(tag), (int, float)):
                scores["train/perplexity"] = last[tag]
        return per_seed


@dataclass
class Group:
    """Runs that differ only in seed: one experiment, one table row."""
    name: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def flags(self) -> dict:
        return self.runs[0].flags

    def values(self, metric: str) -> list[float]:
        return [f[metric] for run in self.runs for f in run.final_per_seed()
                if isinstance(f.get(metric), (int, float))]

    def evaluation_values(self, corpus: str, metric: str) -> list[float]:
        """Per seed: a --num_seeds run's evaluation holds each seed's scores under `seeds`."""
        return [s[metric] for run in self.runs for e in run.evaluations
                if e.get("corpus") == corpus for s in (e.get("seeds") or [e])
                if isinstance(s.get(metric), (int, float))]

    def mean(self, key: str) -> float | None:
        values = [r.summary[key] for r in self.runs if isinstance(r.summary.get(key), (int, float))]
        return statistics.fmean(values) if values else None


def mean_and_spread(values: list[float]) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count; None when empty."""
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread, len(values)


def load_runs(sweep_dir: str, left_out: list[str] | None = None) -> list[RunResult]:
    """The runs under sweep_dir; a run whose summary.json cannot be read is left out with a
    warning (its folder's name appended to `left_out`), unless no run can be read."""
    root = epath.Path(sweep_dir)
    if not root.exists():
        raise UsageError(f"--sweep_dir={sweep_dir} does not exist; pass the folder of a sweep")
    runs = []
    # Run folders sit directly in the sweep folder (one level: a recursive glob on GCS lists
    # every checkpoint object); a single run's folder works too.
    workdirs = [root] if (root / SUMMARY_FILE).exists() else []
    workdirs += [p.parent for p in sorted(root.glob(f"*/{SUMMARY_FILE}"), key=str)]
    unreadable = []
    for workdir in workdirs:
        try:
            summary = read_summary(str(workdir))
            _check_shape(summary, workdir / SUMMARY_FILE)
        except UnreadableSummary as err:  # one damaged run does not cost the whole report
            unreadable.append((workdir, err))
            continue
        evaluations = []
        if (workdir / "eval").exists():
            for path in sorted(workdir.glob("eval/*.json"), key=str):
                try:
                    evaluation = json.loads(path.read_text())
                except ValueError:  # JSONDecodeError, UnicodeDecodeError
                    evaluation = None
                if isinstance(evaluation, dict):
                    evaluations.append(evaluation)
                else:
                    print(f"warning: {path} is not a JSON object, left out", file=sys.stderr)
        runs.append(RunResult(workdir.name, summary, read_metrics(str(workdir)), evaluations))
    if not runs and len(unreadable) == 1:
        raise unreadable[0][1]
    if not runs and unreadable:
        raise UsageError(f"no run's {SUMMARY_FILE} under {sweep_dir} can be read (" + ", ".join(
            str(workdir / SUMMARY_FILE) for workdir, _ in unreadable) + "); run their "
            "training commands again to rewrite them")
    for workdir, err in unreadable:
        print(f"warning: run {workdir.name} left out of the report: {err}", file=sys.stderr)
        if left_out is not None:
            left_out.append(workdir.name)
    if not runs:
        raise UsageError(f"no {SUMMARY_FILE} under {sweep_dir}; is it a sweep's folder?")
    return runs


def _check_shape(summary: dict, path) -> None:
    """The parts of a summary the report reads have the types a run writes."""
    for key, kind in (("flags", dict), ("final", dict), ("last", dict), ("seeds", list)):
        value = summary.get(key)
        if value is not None and not isinstance(value, kind):
            raise UnreadableSummary(f"{path}: '{key}' holds {type(value).__name__}, not what "
                                    f"a run writes; {REWRITE}")
    if not all(isinstance(s, dict) for s in summary.get("seeds") or []):
        raise UnreadableSummary(f"{path}: 'seeds' holds something other than objects; "
                                f"{REWRITE}")


def group_by_seed(runs: list[RunResult]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run.flags.items() if k not in BOOKKEEPING_FLAGS},
                         sort_keys=True, default=str)
        if key not in groups:
            groups[key] = Group(re.sub(r"[_-]seed\d+$", "", run.name))
        groups[key].runs.append(run)
    return list(groups.values())


# Formatting.
def _format_stat(stat, digits: int) -> str:
    if stat is None:
        return "-"
    mean, spread, count = stat
    return f"{mean:.{digits}f}" if count == 1 else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def distinguishable(a: tuple | None, b: tuple | None) -> bool:
    """Whether two (mean, spread, count) stats differ by more than their spread: both from 2
    or more seeds, and the means further apart than the sum of the standard deviations."""
    if a is None or b is None or a[2] < 2 or b[2] < 2:
        return False
    return abs(a[0] - b[0]) > a[1] + b[1]


def marked_column(groups: list[Group], values_of, digits: int) -> list[str]:
    """The column of `values_of(group)`: the lowest mean bold, the means the spread cannot
    tell from it marked ≈ (SPREAD_NOTE)."""
    stats = [mean_and_spread(values_of(g)) for g in groups]
    present = [s for s in stats if s]
    best = min(present, key=lambda s: s[0]) if len(present) > 1 else None
    cells = []
    for stat in stats:
        cell = _format_stat(stat, digits)
        if best is not None and stat is best:
            cell = f"**{cell}**"
        elif best is not None and stat is not None and not distinguishable(stat, best):
            cell += " ≈"
        cells.append(cell)
    return cells


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _evaluation_corpora(groups: list[Group]) -> list[str]:
    return sorted({e.get("corpus") for g in groups for r in g.runs for e in r.evaluations
                   if e.get("corpus")})


def markdown_table(groups: list[Group]) -> str:
    others = _evaluation_corpora(groups)
    columns = [(metric, label, digits) for metric, label, digits in TABLE_COLUMNS
               if any(g.values(metric) for g in groups)]  # a column of dashes says nothing
    header = ["run", "cell", "layers", "hiddens", "corpus", "seeds",
              *[label for _, label, _ in columns], *[f"{c} ppl" for c in others], "tokens/s",
              "wall time", "params"]
    cells = [marked_column(groups, lambda g, m=metric: g.values(m), digits)
             for metric, _, digits in columns]
    cells += [marked_column(groups, lambda g, c=c: g.evaluation_values(c, "perplexity"), 2)
              for c in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, g in enumerate(groups):
        f = g.flags
        stats = [mean_and_spread(g.values(m)) for m in FINAL_METRICS]
        count = max((s[2] for s in stats if s), default=len(g.runs))
        tokens = g.mean("tokens_per_sec")
        params = g.runs[0].summary.get("num_params")
        row = [g.name, f.get("cell", "-"), f.get("num_layers", "-"), f.get("num_hiddens", "-"),
               f.get("corpus", "-"), count, *[column[index] for column in cells],
               f"{tokens:,.0f}" if tokens is not None else "-",
               _format_duration(g.mean("wall_time_s")),
               f"{params:,}" if isinstance(params, int) else "-"]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


# Plots.
def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _headline_metric(group: Group) -> tuple[str, tuple | None]:
    """Test perplexity where the runs have it, else validation, else training (a run without
    a held-out split)."""
    for metric in ("test/perplexity", "validation/perplexity", "train/perplexity"):
        stat = mean_and_spread(group.values(metric))
        if stat:
            return metric, stat
    return "test/perplexity", None


def has_curve(runs: list[RunResult], tag: str) -> bool:
    return any(tag in m for run in runs for m in run.metrics)


def plot_curves(plt, runs: list[RunResult], tag: str = "validation/perplexity"):
    """One line per run: the logged `tag` against the step."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        points = [(m["step"], m[tag]) for m in run.metrics if tag in m and "step" in m]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 60 else None,
                    label=run.name)
    split = tag.split("/")[0]
    ax.set(xlabel="training step", ylabel=f"{split} perplexity",
           title=f"{split.capitalize()} perplexity during training")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_depth(plt, groups: list[Group]):
    """One line per cell (and per corpus etc.): headline perplexity against num_layers."""
    lines: dict[str, list] = {}
    for g in groups:
        rest = {k: v for k, v in g.flags.items()
                if k not in BOOKKEEPING_FLAGS | {"num_layers", "cell"}}
        key = json.dumps(rest, sort_keys=True, default=str)
        lines.setdefault(key, []).append(g)
    varying = {k for key in lines for k, v in json.loads(key).items()
               if any(json.loads(other).get(k) != v for other in lines)}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ylabel = "perplexity"
    for key, members in lines.items():
        extra = ", ".join(f"{k}={json.loads(key).get(k)}" for k in sorted(varying))
        by_cell: dict[str, list] = {}
        for g in members:
            by_cell.setdefault(g.flags.get("cell", "?"), []).append(g)
        for cell, cell_groups in sorted(by_cell.items()):
            points = []
            for g in cell_groups:
                metric, stat = _headline_metric(g)
                if stat and g.flags.get("num_layers") is not None:
                    points.append((g.flags["num_layers"], stat[0], stat[1]))
                    ylabel = metric.replace("/", " ")
            if points:
                x, y, err = zip(*sorted(points), strict=True)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                            label=cell + (f" ({extra})" if extra else ""))
    depths = sorted({g.flags.get("num_layers") for g in groups} - {None})
    ax.set_xticks(depths)
    ax.set(xlabel="layers", ylabel=ylabel, title="Perplexity against depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_corpora(plt, groups: list[Group]):
    """Per training corpus: its own held-out test perplexity, and each other corpus scored."""
    others = _evaluation_corpora(groups)
    series = ["own held-out text", *others]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(series)
    for index, label in enumerate(series):
        heights, errors = [], []
        for g in groups:
            stat = (_headline_metric(g)[1] if index == 0
                    else mean_and_spread(g.evaluation_values(label, "perplexity")))
            heights.append(stat[0] if stat else math.nan)
            errors.append(stat[1] if stat else 0.0)
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(positions, heights, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g.name}\n{g.flags.get('corpus', '')}".replace(",", ",\n")
                        for g in groups], fontsize="small")
    ax.set(ylabel="test perplexity", title="Perplexity per training corpus")
    ax.legend(fontsize="small")
    return fig


def write_report(sweep_dir: str, out_dir: str | None = None) -> str:
    """Writes report.md and the plots to out_dir (default sweep_dir); returns the Markdown."""
    import matplotlib  # deferred: slow to import, optional ([report]), only the report draws

    matplotlib.use("Agg")  # files only: no display on servers and TPU VMs
    import matplotlib.pyplot as plt  # deferred: after choosing the Agg backend above

    left_out: list[str] = []
    runs = load_runs(sweep_dir, left_out)
    if out_dir:
        check_output_folder(out_dir, "out")
    else:
        check_output_folder(sweep_dir, "sweep_dir", "pass --out=FOLDER to write the report "
                                                    "elsewhere")
    groups = group_by_seed(runs)
    out = epath.Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"training_perplexity.png": ("Training perplexity against step",
                                           plot_curves(plt, runs, "train/perplexity"))}
    if has_curve(runs, "validation/perplexity"):
        figures["validation_perplexity.png"] = ("Validation perplexity against step",
                                                plot_curves(plt, runs))
    if len({g.flags.get("num_layers") for g in groups}) > 1:
        figures["perplexity_vs_depth.png"] = ("Perplexity against depth per cell type",
                                              plot_depth(plt, groups))
    if len({g.flags.get("corpus") for g in groups}) > 1:
        figures["perplexity_per_corpus.png"] = ("Perplexity per corpus", plot_corpora(plt, groups))
    for name, (_, fig) in figures.items():
        (out / name).write_bytes(_figure_bytes(fig))
        plt.close(fig)
    seeds_note = ("Values are mean ± sample standard deviation over seeds where a row has "
                  "more than one. Perplexity (ppl) and bits per character (bpc) are final: "
                  "training over the last logging window, validation at the last step, test "
                  "on the best-validation checkpoint.")
    text = "\n\n".join([
        f"# Sweep report: {sweep_dir}",
        f"{len(runs)} runs in {len(groups)} groups. {seeds_note}" + (
            f" Left out, their {SUMMARY_FILE} unreadable: {', '.join(left_out)}."
            if left_out else ""),
        markdown_table(groups), SPREAD_NOTE,
        *[f"![{title}]({name})" for name, (title, _) in figures.items()],
    ]) + "\n"
    (out / "report.md").write_text(text)
    return text
