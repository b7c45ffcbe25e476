"""The loop's bookkeeping on hand-made metrics: skipped updates, overflow, totals."""

import math

import numpy as np
import pytest

from deeprnn.training.progress import NonFiniteError, Progress, train_records
from deeprnn.training.train_step import summarize


class NoCheckpoints:
    def wait(self):
        pass

    def latest_complete_step(self):
        return 12


def call(losses, nonfinite):
    """One compiled call's stacked metrics: per step a loss sum over 10 tokens."""
    n = len(losses)
    return {"loss_sum": np.asarray(losses, float) * 10, "tokens": np.full(n, 10.0),
            "grad_norm": np.where(np.asarray(nonfinite) > 0, np.nan, 1.0),
            "nonfinite": np.asarray(nonfinite, float)}


def records_of(losses, nonfinite, policy="skip", log_every=4):
    return train_records(Progress.fresh(1), [(0, call(losses, nonfinite))],
                         log_every=log_every, last_step=len(losses), nan_policy=policy,
                         store=NoCheckpoints(), lr_fn=lambda step: 0.1, rate=1.0)


def test_a_skipped_update_leaves_the_loss_and_says_how_many_steps_it_covers():
    records = records_of([1.0, math.nan, 3.0, 2.0], [0, 1, 0, 0])
    assert records[4]["train/loss"] == pytest.approx(2.0)  # (1 + 3 + 2) / 3, NaN left out
    assert records[4]["train/loss_steps"] == 3
    # A finite loss whose gradient was not finite is skipped too, and left out the same way.
    records = records_of([1.0, 5.0, 3.0, 2.0], [0, 1, 0, 0])
    assert records[4]["train/loss"] == pytest.approx(2.0)


def test_a_window_whose_every_update_was_skipped_stops_the_run():
    with pytest.raises(NonFiniteError, match=r"every update of steps 5-8 \(all skipped\) at "
                                             r"step 8; last good checkpoint: step 12") as info:
        records_of([1.0, 2.0, 1.0, 1.0, math.nan, math.inf, 4.0, math.nan],
                   [0, 0, 0, 0, 1, 1, 1, 1])
    # It used to advise passing --nan_policy=skip, the policy already in force.
    assert "pass --nan_policy=skip" not in str(info.value)
    assert str(info.value).endswith("lower --lr (or --clip_norm) and run again")


def test_stop_policy_stops_at_the_first_non_finite_step():
    with pytest.raises(NonFiniteError, match="at step 2") as info:
        records_of([1.0, math.nan, 3.0, 2.0], [0, 1, 0, 0], policy="stop")
    assert str(info.value).endswith("lower --lr, or pass --nan_policy=skip to skip such updates")


def test_a_perplexity_that_overflows_is_inf():
    assert summarize(800.0, 1.0)["perplexity"] == math.inf
    assert math.isnan(summarize(math.nan, 1.0)["perplexity"])
    assert summarize(2.0, 1.0)["perplexity"] == pytest.approx(math.exp(2.0))
