"""summary.json: what a run says about itself, and the one rule for "this run has finished".

The training loop rewrites the file whole when it gains something (a validation score, a
checkpoint, the end of the run): flags, sizes, devices, versions, steps done, speed, best and
final metrics. Launchers and `deeprnn.report` read it back, and skip or report a run by the
same `is_finished` rule the training program uses to refuse training a finished run again.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from deeprnn.errors import UsageError
from deeprnn.run.writers import write_text_whole

SUMMARY_FILE = "summary.json"
REWRITE = "run the run's training command again to rewrite it"


def _to_json_value(value: Any) -> Any:
    """JSON for numpy/jax scalars and arrays; anything else becomes its str, so that writing a
    summary at the end of a long run can never fail on an unexpected type."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_summary(workdir: str, summary: dict) -> None:
    """Rewrites `workdir/summary.json` whole (tmp + os.replace locally; one upload on GCS)."""
    text = json.dumps(summary, indent=2, default=_to_json_value) + "\n"
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    write_text_whole(epath.Path(workdir) / SUMMARY_FILE, text)


class UnreadableSummary(UsageError):
    """summary.json is there but holds no JSON object: empty, cut off, damaged or not ours."""


def read_summary(workdir: str) -> dict:
    """The run's summary; UsageError when it has none, UnreadableSummary (a UsageError) when
    the file is not a JSON object."""
    path, text = epath.Path(workdir) / SUMMARY_FILE, ""
    if not path.exists():
        raise UsageError(f"{path} does not exist: is {workdir} the workdir of a run?")
    try:
        text = path.read_text()
        summary = json.loads(text)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        problem = ("is not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "is empty"
                   if not text.strip() else f"is not JSON ({err})")
        raise UnreadableSummary(f"{path} {problem}: cut off or damaged; {REWRITE}") from err
    if not isinstance(summary, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(summary), "a number")
        raise UnreadableSummary(f"{path} holds {kind}, not the JSON object a run writes; "
                                f"{REWRITE}")
    return summary


def summary_if_any(workdir: str) -> dict | None:
    """The run's summary, or None when it has none yet or a crash cut it off mid-write."""
    try:
        return read_summary(workdir)
    except UsageError:  # none yet, or cut off or damaged (UnreadableSummary)
        return None


def is_finished(summary: dict | None) -> bool:
    """A run has finished once its final evaluation is written: `finished` is set with it.
    Summaries from before that key have the test score only at the end, so it counts too."""
    if not summary:
        return False
    return summary.get("finished") is True or "test/perplexity" in (summary.get("final") or {})


def finished_summary(workdir: str, step: int) -> dict | None:
    """The summary of a run that already finished at `step` (its last checkpoint), else None."""
    summary = summary_if_any(workdir)
    return summary if is_finished(summary) and summary.get("steps_done") == step else None
