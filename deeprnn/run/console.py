"""What a training run shows on the console (process 0 only): the progress line, and the line
that ends the run."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """`45s`, `3m12s`, `1h02m`: the two largest units, as a reader of an ETA wants them."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_count(value: float) -> str:
    """`950`, `41.2k`, `3.5M`: three significant figures are what a throughput reader needs."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _format_metric(value: float) -> str:
    # Three significant figures whatever the size: perplexities run from ~1e3 down to ~1.0.
    return f"{value:.3g}" if abs(value) >= 10 else f"{value:.2f}"


class ProgressLine:
    """One compact console line, e.g.
    `step 120/2000 [6%] loss 2.31 ppl 10.1 val 9.8 | 41.2k tok/s | eta 3m12s`.

    `update` takes the metrics dict the run logs (tag names as in metrics.jsonl) and remembers
    the last value of each, since validation comes less often than training loss. The ETA uses
    the step rate since the first update, which leaves compilation (before it) out. On a
    terminal the line rewrites itself (`\\r`); elsewhere (log files, CI) each update is a line.
    """

    SHOWN = (  # (tag, label), in display order
        ("train/loss", "loss"),
        ("train/perplexity", "ppl"),
        ("validation/perplexity", "val"),
    )
    THROUGHPUT_TAG = "train/tokens_per_sec"

    def __init__(
        self,
        total_steps: int,
        stream: TextIO | None = None,
        every_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._clock = clock
        self._is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._latest: dict[str, float] = {}
        self._first: tuple[int, float] | None = None  # (step, time) at the first update
        self._step = 0
        self._last_print = -math.inf
        self._printed_width = 0
        self._printed = ""  # the last line shown

    def update(self, step: int, metrics: dict) -> None:
        now = self._clock()
        self._step = int(step)
        if self._first is None:
            self._first = (self._step, now)
        self._latest.update({tag: float(value) for tag, value in metrics.items()})
        if now - self._last_print >= self.every_s or self._step >= self.total_steps:
            self._print(self.render(now))
            self._last_print = now

    def render(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        percent = int(100 * self._step / self.total_steps) if self.total_steps else 100
        parts = [f"step {self._step}/{self.total_steps} [{percent}%]"]
        parts += [
            f"{label} {_format_metric(self._latest[tag])}"
            for tag, label in self.SHOWN
            if tag in self._latest
        ]
        line = " ".join(parts)
        if self.THROUGHPUT_TAG in self._latest:
            line += f" | {format_count(self._latest[self.THROUGHPUT_TAG])} tok/s"
        return line + f" | eta {self._eta(now)}"

    def done(self) -> None:
        line = self.render()
        if line != self._printed:  # the last update is often the final step, already shown
            self._print(line)
        if self._is_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def _eta(self, now: float) -> str:
        if self._step >= self.total_steps:
            return "0s"
        first_step, first_time = self._first or (self._step, now)
        if self._step <= first_step or now <= first_time:
            return "--"
        seconds_per_step = (now - first_time) / (self._step - first_step)
        return format_duration(seconds_per_step * (self.total_steps - self._step))

    def _print(self, line: str) -> None:
        self._printed = line
        if self._is_terminal:
            # Pad over a longer previous line so that no stale characters remain.
            self.stream.write("\r" + line.ljust(self._printed_width))
            self._printed_width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def final_line(final: dict, train_perplexity: float, tokens_per_sec: float, device) -> str:
    """The held-out scores where the run has a split (what it is judged by), with training
    perplexity beside them; without one, the book's line: `perplexity 1.0, 61234.5 tokens/sec
    on cpu:0 (cpu)`."""
    where = f"{device.platform}:{device.id} ({device.device_kind})"
    speed = f"{tokens_per_sec:.1f} tokens/sec on {where}"
    scores = [f"{split} perplexity {_stat(final, split, 'perplexity', 2)}, "
              f"{_stat(final, split, 'bits_per_char', 3)} bits/char"
              for split in ("validation", "test") if f"{split}/perplexity" in final]
    if not scores:
        return f"perplexity {train_perplexity:.1f}, {speed}"
    if "test/checkpoint_step" in final:  # which parameters the test scored
        which = final.get("test/params", "best-validation")
        scores[-1] += f" ({which} step {final['test/checkpoint_step']})"
    return f"{'; '.join(scores)}; training perplexity {train_perplexity:.2f}; {speed}"


def _stat(record: dict, split: str, metric: str, digits: int) -> str:
    """`4.67`, or `4.67 ± 0.05` over seeds (--num_seeds)."""
    value, spread = record[f"{split}/{metric}"], record.get(f"{split}/{metric}_std")
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")

