"""--steps_per_call and --num_seeds through the whole training program."""

from __future__ import annotations

import numpy as np
import pytest

from deeprnn.errors import UsageError
from deeprnn.run.writers import read_metrics
from deeprnn.training.trained_run import score_corpus
from tests.helpers import run, tiny_argv, write_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "tiny.txt")


@pytest.mark.slow
def test_steps_per_call_equals_one_step_per_call(text_file, tmp_path):
    argv = ["--num_train_steps=24", "--log_every=2", "--eval_every=12", "--checkpoint_every=12"]
    one = run(tiny_argv(text_file, tmp_path / "one", *argv))
    four = run(tiny_argv(text_file, tmp_path / "four", *argv, "--steps_per_call=4"))
    a, b = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "four"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(2, 25, 2))
    for ra, rb in zip(a, b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5)
    assert four["final"]["test/perplexity"] == pytest.approx(one["final"]["test/perplexity"],
                                                             rel=1e-5)


@pytest.mark.slow
def test_logs_read_one_call_behind_equal_logs_read_at_once(text_file, tmp_path):
    """A call that only logs is read while the next one runs; a sample after every call makes
    every call wait to be read instead. The records must be the same."""
    argv = ["--num_train_steps=18", "--steps_per_call=3", "--log_every=3", "--eval_every=9",
            "--checkpoint_every=9"]
    behind = run(tiny_argv(text_file, tmp_path / "behind", *argv, "--sample_every=9"))
    at_once = run(tiny_argv(text_file, tmp_path / "at_once", *argv, "--sample_every=3"))

    def without_rate(workdir):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_sec"}
                for r in read_metrics(str(workdir))]

    records = without_rate(tmp_path / "behind")
    assert [r["step"] for r in records] == [3, 6, 9, 12, 15, 18]
    assert records == without_rate(tmp_path / "at_once")
    assert behind["last"]["train/loss"] == at_once["last"]["train/loss"]
    assert behind["tokens_per_sec"] > 0


def test_intervals_must_be_multiples_of_steps_per_call(text_file, tmp_path):
    with pytest.raises(UsageError, match=r"--eval_every=20 must be a multiple of "
                                         r"--steps_per_call=3"):
        run(tiny_argv(text_file, tmp_path, "--steps_per_call=3"))


@pytest.mark.slow
def test_num_seeds_equals_separate_runs(text_file, tmp_path):
    argv = ["--num_train_steps=20", "--seed=5", "--dropout=0.1", "--sampler=random"]
    together = run(tiny_argv(text_file, tmp_path / "k3", *argv, "--num_seeds=3"))
    records = read_metrics(str(tmp_path / "k3"))
    for k in range(3):
        alone = run(tiny_argv(text_file, tmp_path / f"s{k}", *argv, f"--seed={5 + k}"))
        alone_records = read_metrics(str(tmp_path / f"s{k}"))
        for ra, rk in zip(alone_records, records, strict=True):
            assert rk[f"seed_{k}/train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4)
        assert together["seeds"][k]["test/perplexity"] == pytest.approx(
            alone["final"]["test/perplexity"], rel=1e-4)
    values = [s["validation/perplexity"] for s in together["seeds"]]
    assert together["final"]["validation/perplexity"] == pytest.approx(sum(values) / 3)
    assert together["final"]["validation/perplexity_std"] > 0
    # evaluate scores each seed of such a run, as separate runs would be scored.
    scored = score_corpus(str(tmp_path / "k3"), None, None, "test")
    for k in range(3):
        alone = score_corpus(str(tmp_path / f"s{k}"), None, None, "test")
        assert scored["seeds"][k]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-4)
    assert scored["perplexity"] == pytest.approx(
        sum(s["perplexity"] for s in scored["seeds"]) / 3)
    assert scored["perplexity_std"] > 0


def test_token_array_is_int32_and_refuses_text_past_int32_indices():
    from deeprnn.training.device_batches import token_array

    ids = token_array(np.arange(100, dtype=np.int64) % 7, num_steps=8)
    assert ids.dtype == np.int32 and ids.tolist() == [i % 7 for i in range(100)]
    too_long = np.broadcast_to(np.int32(0), (2**31 - 8,))  # a view: no memory behind it
    with pytest.raises(UsageError, match="int32 window indices"):
        token_array(too_long, num_steps=8)
