"""Sweep definitions expand to the runs and flags they promise."""

import shlex

import pytest

from deeprnn.data.sources import NAMED_SOURCES
from deeprnn.errors import UsageError
from deeprnn.run.summary import is_finished
from launch import sweep as sweeps
from tests.helpers import SHARED_CORPORA


def flagfile_values(path) -> dict[str, str]:
    """The --name=value lines of a flagfile (comments skipped), as absl reads them."""
    values = {}
    for line in (sweeps.REPO_ROOT / path).read_text().splitlines():
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values


def effective_flags(sweep, run) -> dict[str, str]:
    """What train sees: the flagfile, then the run's overrides (absl: later flags win)."""
    return {**flagfile_values(sweep.base_flagfile),
            **{k: str(v) for k, v in run.flags.items()}}


def test_depth_cell_is_three_cells_by_three_depths_on_time_machine():
    sweep = sweeps.load_sweep("depth_cell")
    assert sweep.base_flagfile == "experiments/time_machine_lstm.flags"
    assert (sweeps.REPO_ROOT / sweep.base_flagfile).is_file()
    assert [r.name for r in sweep.runs] == [
        f"{c}_l{n}" for c in ("rnn", "gru", "lstm") for n in (1, 2, 4)]
    for run in sweep.runs:
        cell, layers = run.name.split("_l")
        assert run.flags == {"corpus": "time_machine", "cell": cell, "num_layers": int(layers)}
        assert run.eval_corpora == ()


def test_corpora_sweep_matches_token_budgets_and_holds_out_an_author():
    sweep = sweeps.load_sweep("corpora")
    by_name = {r.name: r for r in sweep.runs}
    assert {n: r.flags["corpus"] for n, r in by_name.items()} == {
        "one_book": "time_machine",
        "two_wells_books": "time_machine,war_of_the_worlds",
        "three_authors": "time_machine,frankenstein,pride_and_prejudice",
        "tiny_shakespeare": "tiny_shakespeare",
    }
    budgets = set()
    for run in sweep.runs:
        flags = effective_flags(sweep, run)
        budgets.add(int(flags["num_train_steps"]) * int(flags["batch_size"])
                    * int(flags["num_steps"]))
        # Scored afterwards on a book whose author is in no training set.
        assert run.eval_corpora == ("war_and_peace",)
        assert "war_and_peace" not in run.flags["corpus"]
    assert budgets == {6000 * 32 * 35}
    named = {n for r in sweep.runs for n in r.flags["corpus"].split(",")} | {"war_and_peace"}
    assert named <= set(NAMED_SOURCES)  # each one downloadable from its canonical source
    if SHARED_CORPORA.is_dir():  # and, where the offline mirror is beside us, in it
        assert all((SHARED_CORPORA / f"{n}.txt").is_file() for n in named)


def test_select_runs_filters_by_glob_and_repeats_per_seed():
    sweep = sweeps.select_runs(sweeps.load_sweep("depth_cell"), "lstm_*,gru_l1", "0,7")
    assert [r.name for r in sweep.runs] == [
        "gru_l1_seed0", "gru_l1_seed7", "lstm_l1_seed0", "lstm_l1_seed7", "lstm_l2_seed0",
        "lstm_l2_seed7", "lstm_l4_seed0", "lstm_l4_seed7"]
    assert sweep.runs[1].flags == {"corpus": "time_machine", "cell": "gru", "num_layers": 1,
                                   "seed": 7}
    with pytest.raises(UsageError, match="matches no run"):
        sweeps.select_runs(sweep, "transformer_*")
    with pytest.raises(UsageError, match="integers"):
        sweeps.select_runs(sweep, None, "a,b")


def test_train_args_put_the_flagfile_first_and_extra_flags_last():
    sweep = sweeps.load_sweep("depth_cell")
    args = sweeps.train_args(sweep, sweep.runs[0], "/s/rnn_l1", data_dir="/corpora",
                             extra_flags=["--num_train_steps=5", "--cell=gru"])
    assert args == ["--flagfile=experiments/time_machine_lstm.flags", "--workdir=/s/rnn_l1",
                    "--data_dir=/corpora", "--corpus=time_machine", "--cell=rnn",
                    "--num_layers=1", "--num_train_steps=5", "--cell=gru"]
    assert sweeps.format_flag("residual", True) == "--residual=true"
    assert sweeps.format_flag("profile_steps", (3, 5)) == "--profile_steps=3,5"
    assert sweeps.shell_join(["a b"], {"X": "1"}) == "X=1 " + shlex.quote("a b")


def test_bad_sweeps_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown sweep 'nope'.*depth_cell"):
        sweeps.load_sweep("nope")
    broken = tmp_path / "broken.py"
    broken.write_text("def runs():\n    yield 'a', {}\n    yield 'a', {}\n")
    with pytest.raises(UsageError, match="defines no BASE_FLAGFILE"):
        sweeps.load_sweep(str(broken))
    broken.write_text("BASE_FLAGFILE = 'x.flags'\ndef runs():\n    yield 'a', {}\n"
                      "    yield 'a', {}\n")
    with pytest.raises(UsageError, match="appears twice"):
        sweeps.load_sweep(str(broken))
    broken.write_text("BASE_FLAGFILE = 'x.flags'\ndef runs():\n    yield 'a b', {}\n")
    with pytest.raises(UsageError, match="must be"):
        sweeps.load_sweep(str(broken))


def test_is_finished_reads_the_finished_mark_or_test_metrics():
    assert not is_finished(None)
    assert not is_finished({"steps_done": 10, "final": {}})
    assert is_finished({"finished": True})
    assert is_finished({"final": {"test/perplexity": 5.0}})


BASE = "BASE_FLAGFILE = 'experiments/time_machine_lstm.flags'\n"


@pytest.mark.parametrize("body, message", [
    (BASE + "def runs(:\n", "SyntaxError: invalid syntax"),
    (BASE + "def runs():\n    return undefined\n", "NameError: name 'undefined' is not defined"),
    (BASE + "def runs():\n    return [('a', {'lr': 1 / 0})]\n", "ZeroDivisionError"),
    (BASE + "runs = [('a', {})]\n", "TypeError: 'list' object is not callable"),
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
], ids=["syntax", "name_error", "zero_division", "runs_not_callable", "sys_exit"])
def test_any_error_in_a_sweep_file_is_one_usage_error(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(UsageError, match=f"^sweep {path}: {message}.*; fix the sweep file$"):
        sweeps.load_sweep(str(path))


@pytest.mark.parametrize("body, message", [
    ("BASE_FLAGFILE = None\ndef runs():\n    yield 'a', {}\n", "BASE_FLAGFILE must be a flagfile"),
    (BASE + "def runs():\n    yield 'a', {}, ['war_and_peace']\n", "third element must be a dict"),
    (BASE + "def runs():\n    yield 'a', [('cell', 'gru')]\n", "flags must be a dict"),
    (BASE + "def runs():\n    yield 'a', {}, {'eval_corpora': None}\n",
     "eval_corpora must be a list of corpus specs, got None"),
    (BASE + "def runs():\n    yield 'a', {}, {'eval_corpus': ['war_and_peace']}\n",
     "unknown metadata key 'eval_corpus'; use eval_corpora"),
    (BASE + "def runs():\n    return []\n", "runs\\(\\) yields no run"),
    (BASE + "def runs():\n    yield 'a', {'workdir': '/tmp/a'}\n", "sets workdir"),
], ids=["base_none", "metadata_list", "flags_list", "eval_corpora_none", "metadata_typo",
        "empty", "workdir"])
def test_a_malformed_sweep_is_refused_before_anything_runs(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(UsageError, match=f"^sweep {path}: .*{message}"):
        sweeps.load_sweep(str(path))
