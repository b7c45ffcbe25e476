"""The training program end to end on tiny text written by the tests."""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib
import subprocess
import sys
from importlib.util import find_spec

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeprnn.config import parse_args
from deeprnn.errors import UsageError
from deeprnn.model.build import build_model, init_params
from deeprnn.model.config import ModelConfig
from deeprnn.model.stack import init_carry
from deeprnn.run.summary import read_summary
from deeprnn.run.writers import read_metrics
from deeprnn.training.optimizer import make_optimizer
from deeprnn.training.train_step import TrainState, summarize, train_step
from tests.helpers import INFO_LOG_LINE, REPO, run, tiny_argv, write_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "tiny.txt")


@pytest.fixture(scope="module")
def finished_run(text_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = run(tiny_argv(text_file, workdir, "--num_train_steps=120", "--eval_every=40",
                            "--checkpoint_every=40"))
    return workdir, summary


def unigram_perplexity(train: str, held_out: str) -> float:
    counts = collections.Counter(train)
    total = sum(counts.values())
    logp = [math.log(counts.get(c, 0.5) / total) for c in held_out]
    return math.exp(-sum(logp) / len(logp))


def test_end_to_end_beats_unigram_and_writes_logs(finished_run, text_file):
    workdir, summary = finished_run
    assert not (workdir / "deeprnn.lock").exists()  # a clean finish leaves no lock
    text = " ".join(text_file.read_text().replace(".", " ").split())
    n = len(text)
    unigram = unigram_perplexity(text[: int(0.9 * n)], text[int(0.9 * n): int(0.95 * n)])
    assert summary["final"]["validation/perplexity"] < 0.5 * unigram
    assert summary["final"]["test/perplexity"] < 0.5 * unigram
    baseline = summary["baseline_perplexity"]
    assert baseline["uniform"] == summary["vocab_size"]
    assert baseline["unigram_validation"] == pytest.approx(unigram, rel=0.05)
    saved = read_summary(str(workdir))
    assert saved["finished"] and saved["steps_done"] == 120 and saved["num_params"] > 0
    # The first call (its compilation) is timed apart, inside the startup and the wall time.
    assert 0 < saved["first_call_s"] <= saved["startup_s"] <= saved["wall_time_s"]
    assert saved["tokens_per_sec"] > 0
    records = read_metrics(str(workdir))
    assert [r["step"] for r in records if "train/loss" in r] == list(range(5, 121, 5))
    tags = set().union(*records)
    for tag in ("train/loss", "train/perplexity", "train/grad_norm", "train/tokens_per_sec",
                "validation/perplexity", "validation/bits_per_char", "test/perplexity",
                "test/bits_per_char"):
        assert tag in tags, tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir))
    acc.Reload()
    scalar_tags = set(acc.Tags()["scalars"])
    assert {"train/perplexity", "validation/perplexity", "test/bits_per_char"} <= scalar_tags
    assert any(t.startswith("samples/") for t in acc.Tags()["tensors"])
    assert list((workdir / "checkpoints").iterdir())


def test_perplexity_is_exp_of_token_weighted_mean_loss():
    losses_a, losses_b = np.full(30, 1.0), np.full(10, 3.0)  # unequal token counts
    total = summarize(losses_a.sum() + losses_b.sum(), 40)
    assert total["perplexity"] == pytest.approx(math.exp(1.5))
    assert total["bits_per_char"] == pytest.approx(1.5 / math.log(2))
    mean_of_ppl = (math.exp(1.0) + math.exp(3.0)) / 2  # what averaging per-batch ppl gives
    assert abs(total["perplexity"] - mean_of_ppl) > 1


def test_clipping_is_applied():
    config = ModelConfig(vocab_size=11, num_hiddens=8, num_layers=2)
    model = build_model(config)
    params = init_params(config, jax.random.PRNGKey(0))
    lr, clip = 0.5, 1e-3
    tx = make_optimizer("sgd", lr, clip)
    state = TrainState(step=jnp.asarray(0), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(1))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 5)), jnp.int32)
    step = jax.jit(functools.partial(train_step, apply_fn=model.apply, tx=tx))
    new, _, metrics = step(state, x, x, init_carry(config, 3), True)
    update = jax.tree.map(lambda a, b: a - b, new.params, params)
    assert float(metrics["grad_norm"]) > 10 * clip
    assert float(optax.tree.norm(update)) == pytest.approx(lr * clip, rel=1e-4)


@pytest.mark.slow
def test_resume_equals_uninterrupted(text_file, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    argv = ["--sampler=sequential", "--dropout=0.1"]
    run(tiny_argv(text_file, straight, *argv))
    run(tiny_argv(text_file, halves, *argv, "--num_train_steps=20"))
    run(tiny_argv(text_file, halves, *argv))
    a, b = read_metrics(str(straight)), read_metrics(str(halves))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train/loss", "train/grad_norm", "validation/perplexity"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    # The first half ended its own (shorter) budget with a test score at step 20; the last
    # record of both runs is the full run's.
    assert a[-1]["test/perplexity"] == b[-1]["test/perplexity"]
    from deeprnn.training.trained_run import load_trained_run

    pa, pb = load_trained_run(str(straight)).params, load_trained_run(str(halves)).params
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_rerunning_a_finished_run_changes_nothing(text_file, tmp_path, capsys):
    argv = tiny_argv(text_file, tmp_path, "--num_train_steps=20")
    first = run(argv)
    before = (tmp_path / "summary.json").read_text()
    assert run(argv) == first and first["tokens_per_sec"] > 0
    assert (tmp_path / "summary.json").read_text() == before
    assert f"{tmp_path} finished at step 20; nothing to do" in capsys.readouterr().err


def test_a_relative_workdir_trains_saves_and_loads(text_file, tmp_path, monkeypatch):
    from deeprnn.training.trained_run import load_trained_run

    monkeypatch.chdir(tmp_path)  # Orbax refuses relative paths; the README's use them
    summary = run(tiny_argv(text_file, pathlib.Path("runs/rel"), "--num_train_steps=20"))
    assert summary["finished"] and load_trained_run("runs/rel").step == 20


def test_a_run_is_read_back_with_the_kernel_of_the_machine_that_reads_it(text_file, tmp_path):
    """--lstm_kernel is a speed choice of the training machine (every kernel saves the same
    layout): generation and evaluation read the run back with auto, so a run trained with
    cuDNN on a GPU is read on a CPU."""
    from deeprnn.training.trained_run import load_trained_run

    run(tiny_argv(text_file, tmp_path, "--num_train_steps=5", "--eval_every=5",
                  "--checkpoint_every=5", "--lstm_kernel=fused"))
    trained = load_trained_run(str(tmp_path))
    assert trained.config.lstm_kernel == trained.model_config.lstm_kernel == "auto"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on a GPU")
def test_cudnn_kernel_off_a_gpu_is_refused_before_the_workdir_is_touched(text_file, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(UsageError, match="--lstm_kernel=cudnn needs a CUDA GPU"):
        run(tiny_argv(text_file, workdir, "--lstm_kernel=cudnn"))
    assert not workdir.exists()


@pytest.mark.slow
def test_resume_below_steps_a_crash_left_saves_over_them(text_file, tmp_path):
    """A crash after best/40 and during checkpoints/40: the run resumes from 20 and must save
    best/30 and checkpoints/30 below them (Orbax skips a step below its newest folder)."""
    from deeprnn.run.checkpoints import COMPLETE_RECORD, RunCheckpoints

    argv = ["--eval_every=10", "--checkpoint_every=20"]
    run(tiny_argv(text_file, tmp_path, *argv))
    best = RunCheckpoints(str(tmp_path / "best"), max_to_keep=1, async_save=False)
    assert best.complete_steps() == [40]  # validation improves at every evaluation here
    best.close()
    (tmp_path / "checkpoints" / "40" / COMPLETE_RECORD).unlink()  # as if killed in the save
    summary = run(tiny_argv(text_file, tmp_path, *argv, "--num_train_steps=30"))
    assert summary["finished"] and summary["best"]["step"] == 30
    for folder, expected in (("best", [30]), ("checkpoints", [20, 30])):
        store = RunCheckpoints(str(tmp_path / folder), async_save=False)
        assert (store.complete_steps(), store.incomplete_steps()) == (expected, []), folder
        store.close()


def test_flags_after_flagfile_override_it(tmp_path):
    config, _ = parse_args([f"--flagfile={REPO}/experiments/d2l_lstm.flags", "--lr=0.25",
                            "--num_layers=3"])
    assert (config.lr, config.num_layers, config.max_tokens) == (0.25, 3, 10000)
    config, _ = parse_args(["--lr=0.25", f"--flagfile={REPO}/experiments/d2l_lstm.flags"])
    assert config.lr == 2.0  # the flagfile, read later, wins


def test_variant_flagfiles_are_the_base_plus_their_own_lines(monkeypatch, tmp_path):
    """d2l_gru.flags reads d2l_lstm.flags first, then overrides it; absl reads a nested
    flagfile's path from the current folder, so from elsewhere the error says where to run."""
    monkeypatch.chdir(REPO)
    base, _ = parse_args(["--flagfile=experiments/d2l_lstm.flags"])
    gru, _ = parse_args(["--flagfile=experiments/d2l_gru.flags"])
    rnn, _ = parse_args(["--flagfile=experiments/d2l_rnn_scratch.flags"])
    assert gru == dataclasses.replace(base, cell="gru")
    assert rnn == dataclasses.replace(base, cell="rnn", impl="scratch", lr=1.0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="nested ones too, are read from the current folder: "
                                         "run from the repository root"):
        parse_args([f"--flagfile={REPO}/experiments/d2l_gru.flags"])


@pytest.mark.parametrize("flagfile", sorted((REPO / "experiments").glob("*.flags")),
                         ids=lambda p: p.stem)
def test_every_flagfile_runs_two_steps(flagfile, text_file, tmp_path, monkeypatch,
                                      quick_compile):
    monkeypatch.chdir(REPO)  # variant flagfiles name their base from the repository root
    summary = run([f"--flagfile={flagfile}", f"--corpus=file:{text_file}", "--num_hiddens=8",
                   "--num_train_steps=2", "--batch_size=4", "--num_steps=8",
                   "--eval_batch_size=2", "--sample_length=5", f"--workdir={tmp_path}"])
    assert summary["steps_done"] == 2 and math.isfinite(summary["last"]["train/loss"])


@pytest.mark.parametrize("extra, message", [
    (["--num_layers=0"], "--num_layers must be at least 1"),
    (["--lr=-1"], "--lr must be a positive number"),
    (["--batch_size=4000"], "batch_size"),
    (["--split=0.5,0.2,0.2"], "add up to 1"),
    (["--flagfile=/nonexistent.flags"], "Unable to open flagfile"),
    (["--no_such_flag=1"], "Unknown command line flag"),
])
def test_bad_flags_are_refused(extra, message, text_file, tmp_path):
    with pytest.raises(UsageError, match=message):
        run(tiny_argv(text_file, tmp_path, *extra))
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").iterdir())


def test_training_without_tensorboardx(text_file, tmp_path, monkeypatch):
    """The lent GPU machines have no tensorboardX: --notensorboard trains and keeps
    metrics.jsonl; without it the run is refused before anything is written, naming the fix."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "tensorboardX" else find_spec(name, *a))
    with pytest.raises(UsageError, match="--notensorboard"):
        run(tiny_argv(text_file, tmp_path / "refused", "--num_train_steps=10"))
    assert not (tmp_path / "refused").exists()
    workdir = tmp_path / "run"
    run(tiny_argv(text_file, workdir, "--num_train_steps=10", "--eval_every=10",
                  "--checkpoint_every=10", "--notensorboard"))
    assert [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r] == [5, 10]
    assert not [p for p in workdir.iterdir() if "tfevents" in p.name]


def test_resume_with_other_model_flags_is_refused(finished_run, text_file):
    workdir, _ = finished_run
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(UsageError, match=r"--num_hiddens \(checkpoint 24, now 32\)"):
        run(tiny_argv(text_file, workdir, "--num_train_steps=160", "--num_hiddens=32"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(text_file, tmp_path):
    with pytest.raises(UsageError, match=r"non-finite .* at step \d+; last good checkpoint"):
        run(tiny_argv(text_file, tmp_path, "--optimizer=sgd", "--lr=1e38", "--clip_norm=1e38",
                      "--num_train_steps=60"))


@pytest.mark.slow
def test_generate_command_matches_in_process_reference(finished_run):
    workdir, _ = finished_run
    from deeprnn.generate import generate_text

    expected = generate_text(str(workdir), "the time", 20)
    out = subprocess.run([sys.executable, "-m", "deeprnn.generate", f"--workdir={workdir}",
                          "--prefix=the time", "--length=20"], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == expected
    assert expected.startswith("the time") and len(expected) == len("the time") + 20
    assert not INFO_LOG_LINE.search(out.stderr), out.stderr[:300]  # Orbax's, by default


@pytest.mark.slow
def test_evaluate_command_scores_other_text(finished_run, tmp_path):
    workdir, summary = finished_run
    other = tmp_path / "other.txt"
    other.write_text("the machine of time and the traveller zzz qqq " * 20)
    out = subprocess.run([sys.executable, "-m", "deeprnn.evaluate", f"--workdir={workdir}",
                          f"--corpus=file:{other}", "--split=all"], capture_output=True,
                         text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout)
    assert result["unk_rate"] > 0 and math.isfinite(result["perplexity"])
    assert not INFO_LOG_LINE.search(out.stderr), out.stderr[:300]
    assert "warning" not in out.stderr  # a few unknown letters: the score still means much
    # A text of letters the run never saw is mostly <unk>: the score means little, and stderr
    # says so (a run on --preprocess=raw meets this with a text in another script).
    other.write_text("zzqqj xxjjz " * 40)
    out = subprocess.run([sys.executable, "-m", "deeprnn.evaluate", f"--workdir={workdir}",
                          f"--corpus=file:{other}", "--split=all", "--eval_batch_size=3"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout)["unk_rate"] > 0.5
    assert "warning: " in out.stderr and "vocabulary lacks (<unk>)" in out.stderr
    done = subprocess.run([sys.executable, "-m", "deeprnn.evaluate", f"--workdir={workdir}",
                           f"--corpus=file:{other}", "--split=test", "--eval_batch_size=0"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "--eval_batch_size must be at least 1" in done.stderr


def test_another_corpus_is_scored_whole_not_cut_to_the_runs_max_tokens():
    from deeprnn.config import RunConfig
    from deeprnn.training.evaluation import scoring_config

    trained = RunConfig(corpus="time_machine", max_tokens=10000, split="0.9,0.05,0.05")
    own = scoring_config(trained, None, None, "test")
    other = scoring_config(trained, "war_and_peace", "/mirror", "test")
    whole = scoring_config(trained, None, None, "all")
    assert (own.corpus, own.max_tokens) == ("time_machine", 10000)  # the run's own test split
    assert (other.corpus, other.max_tokens, other.data_dir) == ("war_and_peace", 0, "/mirror")
    assert (whole.split, whole.max_tokens) == ("1,0,0", 0)


def test_profile_steps_write_a_trace_for_tensorboard(text_file, tmp_path):
    run(tiny_argv(text_file, tmp_path, "--num_train_steps=6", "--profile_steps=2,3",
                  "--eval_every=6", "--checkpoint_every=6"))
    traces = list((tmp_path / "profile" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_throughput_leaves_the_first_call_out():
    from deeprnn.training.progress import net_of_first_call

    # 100 steps in 12 s, of which the first call took 2 s for 10 steps.
    assert net_of_first_call(100, 12.0, (2.0, 10)) == (90, pytest.approx(10.0))
    # A run of one call has nothing else to measure: the first call stays in.
    assert net_of_first_call(10, 2.5, (2.5, 10)) == (10, 2.5)
