"""The sweep report on fabricated runs whose means, spreads and rows are known by hand."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from deeprnn.errors import UsageError
from deeprnn.run import sweep_results as report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_FLAGS = {"corpus": "time_machine", "num_hiddens": 32, "lr": 2.0, "num_train_steps": 100,
              "workdir": "ignored", "data_dir": "ignored", "log_every": 10}


def write_run(sweep_dir, name, flags, final, *, seeds=None, tokens_per_sec=1000.0,
              wall_time_s=60.0, num_params=12345, evaluations=(), curve=(9.0, 7.0),
              last=None):
    workdir = sweep_dir / name
    workdir.mkdir(parents=True)
    summary = {"flags": {**BASE_FLAGS, **flags, "workdir": str(workdir)},
               "num_params": num_params, "steps_done": 100, "wall_time_s": wall_time_s,
               "tokens_per_sec": tokens_per_sec, "final": final, "finished": True,
               "last": last or {}}
    if seeds:
        summary["seeds"] = seeds
    (workdir / "summary.json").write_text(json.dumps(summary))
    records = [{"step": 10, "train/loss": 2.5, "train/perplexity": 12.2}]
    records += [{"step": 50 * (i + 1), "validation/perplexity": v} for i, v in enumerate(curve)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for evaluation in evaluations:
        (workdir / "eval").mkdir(exist_ok=True)
        (workdir / "eval" / f"{evaluation['corpus']}-test.json").write_text(
            json.dumps(evaluation))


def final(test_ppl, test_bpc=2.0, val_ppl=None, val_bpc=2.1):
    return {"validation/perplexity": val_ppl or test_ppl + 0.5, "validation/bits_per_char": val_bpc,
            "test/perplexity": test_ppl, "test/bits_per_char": test_bpc}


@pytest.fixture
def sweep_dir(tmp_path):
    """lstm and gru at 1 and 2 layers; lstm_l1 and gru_l1 with two seeds as separate runs,
    lstm_l2 with three seeds in one run (--num_seeds), gru_l2 one seed; one run scored on
    War and Peace."""
    root = tmp_path / "sweep"
    for seed, (ppl, bpc, tps, wall) in enumerate([(5.0, 2.0, 1000.0, 65.0),
                                                   (6.0, 2.2, 3000.0, 75.0)]):
        write_run(root, f"lstm_l1_seed{seed}", {"cell": "lstm", "num_layers": 1, "seed": seed},
                  final(ppl, bpc), tokens_per_sec=tps, wall_time_s=wall,
                  evaluations=[{"corpus": "war_and_peace", "split": "test",
                                "perplexity": 9.0 + 2 * seed, "unk_rate": 0.0}])
        write_run(root, f"gru_l1_seed{seed}", {"cell": "gru", "num_layers": 1, "seed": seed},
                  final(7.0 + seed))
    write_run(root, "lstm_l2", {"cell": "lstm", "num_layers": 2},
              final(4.0), seeds=[final(4.0), final(5.0), final(6.0)], num_params=54321)
    write_run(root, "gru_l2", {"cell": "gru", "num_layers": 2}, final(6.5, val_ppl=6.75))
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in
            ([c.strip() for c in row.strip("|").split("|")] for row in rows[1:])}


def test_seed_groups_have_the_hand_computed_means_and_spreads(sweep_dir):
    groups = {g.name: g for g in report.group_by_seed(report.load_runs(str(sweep_dir)))}
    assert sorted(groups) == ["gru_l1", "gru_l2", "lstm_l1", "lstm_l2"]
    assert [r.name for r in groups["lstm_l1"].runs] == ["lstm_l1_seed0", "lstm_l1_seed1"]
    # mean of 5 and 6; sample std sqrt(((5-5.5)^2 + (6-5.5)^2) / 1) = sqrt(0.5)
    mean, spread, count = report.mean_and_spread(groups["lstm_l1"].values("test/perplexity"))
    assert (mean, count) == (5.5, 2) and spread == pytest.approx(0.5 ** 0.5)
    # the three vmapped seeds of one run: 4, 5, 6 -> 5 ± 1
    assert report.mean_and_spread(groups["lstm_l2"].values("test/perplexity")) == (5.0, 1.0, 3)
    assert report.mean_and_spread([]) is None


def test_report_table_and_plots(sweep_dir, tmp_path):
    out = tmp_path / "out"
    markdown = report.write_report(str(sweep_dir), str(out))
    assert (out / "report.md").read_text() == markdown
    rows = table_rows(markdown)
    assert list(rows) == ["gru_l1", "gru_l2", "lstm_l1", "lstm_l2"]
    lstm_l1 = rows["lstm_l1"]
    assert lstm_l1["cell"] == "lstm" and lstm_l1["layers"] == "1" and lstm_l1["seeds"] == "2"
    assert lstm_l1["corpus"] == "time_machine" and lstm_l1["hiddens"] == "32"
    # Marks (hand-checked): lstm_l2's 5.00 ± 1.00 is the lowest; lstm_l1 is within the two
    # spreads of it (0.5 <= 0.71 + 1.00); gru_l1 is not (2.5 > 1.71); gru_l2 has one seed.
    assert lstm_l1["test ppl"] == "5.50 ± 0.71 ≈"
    assert rows["gru_l1"]["test ppl"] == "7.50 ± 0.71"
    assert lstm_l1["test bpc"] == "2.100 ± 0.141 ≈"  # 2.0 and 2.2
    assert lstm_l1["val ppl"] == "6.00 ± 0.71 ≈"
    assert lstm_l1["war_and_peace ppl"] == "10.00 ± 1.41"  # 9 and 11
    assert lstm_l1["tokens/s"] == "2,000" and lstm_l1["wall time"] == "1m 10s"
    assert rows["lstm_l2"]["test ppl"] == "**5.00 ± 1.00**" and rows["lstm_l2"]["seeds"] == "3"
    assert rows["lstm_l2"]["params"] == "54,321"
    assert rows["gru_l2"]["test ppl"] == "6.50 ≈" and rows["gru_l2"]["val ppl"] == "6.75 ≈"
    assert "train ppl" not in rows["gru_l2"]  # no run logged one: no column of dashes
    assert rows["gru_l2"]["war_and_peace ppl"] == "-"
    for name in ("training_perplexity.png", "validation_perplexity.png",
                 "perplexity_vs_depth.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        height, width, _ = matplotlib.image.imread(out / name).shape
        assert height > 100 and width > 100
        assert f"]({name})" in markdown
    # One corpus only: no per-corpus bars.
    assert not (out / "perplexity_per_corpus.png").exists()


def test_corpus_bars_appear_when_runs_differ_in_corpus(tmp_path):
    root = tmp_path / "corpora"
    evaluation = [{"corpus": "war_and_peace", "split": "test", "perplexity": 12.0}]
    write_run(root, "one_book", {"cell": "lstm", "num_layers": 2}, final(5.0),
              evaluations=evaluation)
    write_run(root, "shakespeare", {"cell": "lstm", "num_layers": 2,
                                    "corpus": "tiny_shakespeare"}, final(4.5),
              evaluations=evaluation)
    markdown = report.write_report(str(root))
    assert (root / "perplexity_per_corpus.png").read_bytes().startswith(PNG_MAGIC)
    assert not (root / "perplexity_vs_depth.png").exists()
    rows = table_rows(markdown)
    assert rows["shakespeare"]["corpus"] == "tiny_shakespeare"
    assert rows["shakespeare"]["war_and_peace ppl"] == "12.00 ≈"  # one seed each: no spread
    assert rows["one_book"]["war_and_peace ppl"] == "**12.00**"


def test_report_command_line_prints_the_markdown_and_rejects_a_missing_folder(
        sweep_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "deeprnn.report", f"--sweep_dir={sweep_dir}"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == (sweep_dir / "report.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "deeprnn.report",
                              f"--sweep_dir={tmp_path / 'nothing'}"], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no summary.json"):
        report.load_runs(str(empty))


def test_a_run_whose_summary_cannot_be_read_is_left_out_with_a_warning(tmp_path, capsys):
    """An empty summary.json (a JSONDecodeError) or one holding a list (an AttributeError)
    used to end the whole report in a traceback."""
    root = tmp_path / "sweep"
    write_run(root, "good", {"cell": "lstm", "num_layers": 1}, final(5.0),
              evaluations=[{"corpus": "war_and_peace", "perplexity": 9.0}])
    (root / "good" / "eval" / "frankenstein-test.json").write_text("[1]")
    for name, content in (("empty", ""), ("a_list", "[1, 2]"), ("odd_flags", '{"flags": []}')):
        (root / name).mkdir()
        (root / name / "summary.json").write_text(content)
    markdown = report.write_report(str(root))
    assert list(table_rows(markdown)) == ["good"]
    assert "Left out, their summary.json unreadable: a_list, empty, odd_flags." in markdown
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: ") for w in warnings)
    assert f"{root / 'good' / 'eval' / 'frankenstein-test.json'} is not a JSON object" in \
        warnings[0]
    assert warnings[1].startswith(f"warning: run a_list left out of the report: "
                                  f"{root / 'a_list' / 'summary.json'} holds an array")
    assert f"{root / 'empty' / 'summary.json'} is empty" in warnings[2]
    assert f"{root / 'odd_flags' / 'summary.json'}: 'flags' holds list" in warnings[3]


def test_a_report_with_no_readable_run_is_one_error_naming_the_files(tmp_path, capsys):
    root = tmp_path / "sweep"
    (root / "run").mkdir(parents=True)
    (root / "run" / "summary.json").write_text("[]")
    with pytest.raises(UsageError, match=r"run/summary.json holds an array"):
        report.write_report(str(root))
    (root / "other").mkdir()
    (root / "other" / "summary.json").write_text("")
    with pytest.raises(UsageError, match=r"no run's summary.json under .* can be read \(.*"
                                         r"other/summary.json, .*run/summary.json\)"):
        report.write_report(str(root))
    assert capsys.readouterr().err == ""  # the error line alone, no warnings before it
    assert sorted(p.name for p in root.iterdir()) == ["other", "run"]


def test_report_output_folder_is_checked_before_anything_is_drawn(sweep_dir, tmp_path,
                                                                  monkeypatch):
    """--out=<a file> failed after the plots with `File exists`, naming no flag."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"--out=.*a_file is a file, not a folder; give a "
                                         r"folder$"):
        report.write_report(str(sweep_dir), str(blocker))
    with pytest.raises(UsageError, match=r"--out=.*a_file/plots: .*a_file is a file, not a "
                                         r"folder"):
        report.write_report(str(sweep_dir), str(blocker / "plots"))
    # A sweep folder the user cannot write (root can, so its permission is faked here).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(sweep_dir) and
                        real_access(path, mode))
    with pytest.raises(UsageError, match=r"--sweep_dir=.*: cannot write in .* \(permission "
                                         r"denied\); pass --out=FOLDER to write the report "
                                         r"elsewhere"):
        report.write_report(str(sweep_dir))
    assert not list(sweep_dir.glob("*.png")) and not (sweep_dir / "report.md").exists()


def test_runs_without_a_held_out_split_are_reported_by_training_perplexity(tmp_path):
    """The book's recipe has no validation or test split: training perplexity is its score,
    per seed of a --num_seeds run, and no validation plot is drawn."""
    root = tmp_path / "recipe"
    write_run(root, "d2l_lstm", {"cell": "lstm", "num_layers": 2, "split": "1,0,0",
                                 "num_seeds": 3}, {}, curve=(),
              last={"train/perplexity": 1.03, **{f"seed_{k}/train/perplexity": v
                                                  for k, v in enumerate((1.02, 1.03, 1.04))}})
    write_run(root, "d2l_gru", {"cell": "gru", "num_layers": 2, "split": "1,0,0"}, {},
              curve=(), last={"train/perplexity": 1.5})
    markdown = report.write_report(str(root))
    rows = table_rows(markdown)
    assert rows["d2l_lstm"]["train ppl"] == "**1.030 ± 0.010**"
    assert rows["d2l_gru"]["train ppl"] == "1.500 ≈"  # one seed: no spread to support it
    assert "val ppl" not in rows["d2l_lstm"] and rows["d2l_lstm"]["seeds"] == "3"
    assert (root / "training_perplexity.png").read_bytes().startswith(PNG_MAGIC)
    assert not (root / "validation_perplexity.png").exists()


def test_distinguishable_needs_two_seeds_a_side_and_a_gap_wider_than_the_spreads():
    assert report.distinguishable((5.0, 0.1, 3), (6.0, 0.2, 3))
    assert not report.distinguishable((5.0, 0.5, 3), (6.0, 0.6, 3))
    assert not report.distinguishable((5.0, 0.0, 1), (9.0, 0.1, 3))



def test_a_num_seeds_runs_evaluation_counts_each_seed(tmp_path):
    root = tmp_path / "corpora"
    evaluation = [{"corpus": "war_and_peace", "split": "test", "perplexity": 12.0,
                   "seeds": [{"perplexity": 11.0}, {"perplexity": 12.0}, {"perplexity": 13.0}]}]
    write_run(root, "one_book", {"cell": "lstm", "num_layers": 2, "num_seeds": 3},
              final(5.0), evaluations=evaluation)
    rows = table_rows(report.write_report(str(root)))
    assert rows["one_book"]["war_and_peace ppl"] == "12.00 ± 1.00"
