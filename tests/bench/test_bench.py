"""deeprnn.bench on a tiny config, in process; its --e2e mode starts training processes."""

import json
import os
import subprocess
import sys

import pytest

from deeprnn.bench import cli as bench
from deeprnn.errors import UsageError
from tests.helpers import REPO, SHARED_CORPORA


def test_bench_writes_rows_with_equal_losses(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--configs=tiny", "--impls=fused,scratch,matmul-floor", f"--json={out}",
                       "--repeats=2", "--steps=4", "--steps_per_call=2", "--no_cache"])
    written = json.loads(out.read_text())
    assert [r["implementation"] for r in written] == ["fused", "scratch", "matmul-floor"]
    assert written == json.loads(json.dumps(rows))
    for row in written:
        for key in ("implementation", "config", "device", "ms_per_step", "tokens_per_sec",
                    "ratio_vs_torch_d2l_loop", "dtype", "matmul_precision", "compile_s",
                    "peak_mem_bytes", "loss_after_k"):
            assert key in row
        assert row["ms_per_step"] > 0 and row["config"] == "tiny"
        assert row["ratio_vs_torch_d2l_loop"] is None  # no torch row asked for
    # Same initial parameters, same batches, same steps: the same loss.
    assert written[0]["loss_after_k"] == pytest.approx(written[1]["loss_after_k"], abs=1e-5)
    assert written[2]["loss_after_k"] is None  # the floor is a reference: it trains nothing
    assert "fused" in capsys.readouterr().out


def test_a_row_that_does_other_work_is_flagged(capsys):
    """Equal losses after k steps are the proof that rows do the same work (on a GPU, that
    cuDNN reads the packed weights as cudnn_lstm.py writes them): a difference is said."""
    options = bench.parse_options([])
    rows = [{"config": "big", "implementation": name, "loss_after_k": loss}
            for name, loss in (("fused", 3.3328), ("matmul-floor", None), ("cudnn", 3.3329),
                               ("torch-tight", 3.41))]
    bench._check_same_work(rows, options)
    err = capsys.readouterr().err
    assert "torch-tight: loss after k steps 3.41000, fused 3.33280" in err
    assert "cudnn" not in err and "floor" not in err


def test_bench_rejects_unknown_config_and_repeated_rows():
    with pytest.raises(UsageError, match="--configs"):
        bench.main(["--configs=huge"])
    with pytest.raises(UsageError, match="--impls names fused twice"):
        bench.main(["--impls=fused,scratch,fused"])


def test_seed_rows_aggregate_tokens_over_seeds_that_train_apart():
    """The seeds config: K vmapped seeds and K separate runs do the same work seed for seed
    (seed 0 that of every other row), and tokens/s counts every seed's tokens."""
    rows = bench.main(["--configs=tiny,tiny-seeds", "--impls=fused", "--repeats=1",
                       "--steps=2", "--steps_per_call=2", "--no_cache"])
    fused, one, vmap, separate = rows
    assert [r["implementation"] for r in rows[1:]] == [
        "fused x 1 seed", "fused x 3 seeds (vmap)", "fused x 3 seeds (separate)"]
    assert [r["seeds"] for r in rows[1:]] == [1, 3, 3]
    for row in rows[1:]:
        assert row["loss_after_k"] == pytest.approx(fused["loss_after_k"], abs=1e-5)
        shape = row["shape"]
        tokens = row["seeds"] * shape["batch"] * shape["steps"]
        assert row["tokens_per_sec"] == pytest.approx(tokens / (row["ms_per_step"] / 1e3))
        assert row["ratio_vs_one_seed"] == pytest.approx(
            row["tokens_per_sec"] / one["tokens_per_sec"])
    assert vmap["loss_after_k_per_seed"] == pytest.approx(separate["loss_after_k_per_seed"],
                                                          abs=1e-5)
    assert len(set(vmap["loss_after_k_per_seed"])) == 3  # each seed its own init and data
    assert "ratio_vs_one_seed" not in fused


@pytest.mark.parametrize("precision,dtype,deeprnn,torch", [
    ("highest", "float32", "float32", "float32"),
    ("default", "float32", "float32", "float32"),  # a CPU has no TF32
    ("tf32", "bfloat16", "bf16 (f32 acc)", "autocast bf16")])
def test_header_and_rows_say_each_sides_precision(precision, dtype, deeprnn, torch, capsys):
    impls = "fused,cudnn" + (",torch-tight" if bench.torch_available() else "")
    rows = bench.main(["--configs=tiny", f"--impls={impls}", "--repeats=1", "--steps=2",
                       "--steps_per_call=2", "--no_cache", f"--precision={precision}",
                       f"--dtype={dtype}"])
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0]
    assert f"matmul precision (--precision={precision}): deeprnn {deeprnn}" in header
    # cuDNN's binding lowers on CUDA GPUs only: the row is skipped here, saying why.
    assert "skipping the cudnn row" in captured.err
    assert [r["implementation"] for r in rows][:1] == ["fused"]
    for row in rows:
        assert row["precision"] == precision
        assert row["matmul_precision"] == (torch if row["implementation"].startswith("torch")
                                           else deeprnn)
    if bench.torch_available():
        assert f"; torch {torch}" in header


@pytest.mark.parametrize("spec", ["layerwise", "diagonal:2", "layerwise:0", "layerwise:2:fast",
                                  "layerwise:2,layerwise:2"])
def test_bench_rejects_malformed_fused_variants(spec):
    with pytest.raises(UsageError, match="--fused_variants"):
        bench.main([f"--fused_variants={spec}"])


def test_fused_variant_rows_do_the_same_work(tmp_path):
    rows = bench.main(["--configs=tiny", "--impls=fused", "--repeats=1", "--steps=2",
                       "--steps_per_call=2", "--no_cache",
                       "--fused_variants=wavefront:1,layerwise:2:generic,layerwise:1:autodiff,"
                       "layerwise:1:graph"])
    # graph's XLA:GPU options are checked by name and value on the CPU too, then ignored.
    assert [r["implementation"] for r in rows] == [
        "fused", "fused(wavefront,u1)", "fused(layerwise,u2,generic)",
        "fused(layerwise,u1,autodiff)", "fused(layerwise,u1,graph)"]
    for row in rows[1:]:
        assert row["loss_after_k"] == pytest.approx(rows[0]["loss_after_k"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_CORPORA / "time_machine.txt").is_file(),
                    reason="no shared corpus mirror")
def test_end_to_end_times_cold_and_warm_training_processes(tmp_path):
    """deeprnn's training program run twice as processes (fresh, then filled compile cache)
    on a tiny recipe, with TensorBoard off; the torch row joins where torch is installed."""
    recipe = tmp_path / "tiny.flags"
    recipe.write_text("\n".join([
        "--corpus=time_machine", "--preprocess=d2l_lines", "--max_tokens=1200", "--split=1,0,0",
        "--sampler=sequential", "--batch_size=4", "--num_steps=8", "--num_hiddens=8",
        "--log_every=2", "--sample_length=5"]) + "\n")
    out = tmp_path / "e2e.json"
    rows = bench.main([f"--e2e={SHARED_CORPORA / 'time_machine.txt'}", "--e2e_epochs=1",
                       f"--e2e_flagfile={recipe}", f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    names = [r["implementation"] for r in rows]
    assert names[:2] == ["deeprnn (cold compile cache)", "deeprnn (warm compile cache)"]
    assert names[2:] == (["torch-d2l-train_ch8"] if bench.torch_available() else [])
    for row in rows:
        assert row["wall_s"] > 0 and row["epochs"] == 1 and row["train_perplexity"] > 1
    for row in rows[:2]:  # deeprnn's first call (compilation or a cache read) within its wall
        assert 0 < row["first_call_s"] <= row["startup_s"] < row["wall_s"]
        assert row["speedup_vs_torch"] is None  # torch ran the book's recipe, not this one
    assert rows[0]["impl"] == "fused"  # the default: the recipe runs the fast path
    assert rows[0]["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_CORPORA / "time_machine.txt").is_file(),
                    reason="no shared corpus mirror")
def test_end_to_end_keeps_going_when_a_side_fails(tmp_path, capsys):
    recipe = tmp_path / "broken.flags"
    recipe.write_text("--num_layers=0\n")
    argv = [f"--e2e={SHARED_CORPORA / 'time_machine.txt'}", "--e2e_epochs=1",
            f"--e2e_flagfile={recipe}", f"--json={tmp_path / 'e2e.json'}"]
    if bench.torch_available():
        rows = bench.main(argv)
        assert [r["implementation"] for r in rows] == ["torch-d2l-train_ch8"]
    else:  # no side left: one line, status 1, and no JSON of nothing
        with pytest.raises(SystemExit) as stopped:
            bench.main(argv)
        assert stopped.value.code == 1 and not (tmp_path / "e2e.json").exists()
    assert capsys.readouterr().err.count("--num_layers must be at least 1") == 2


def test_end_to_end_refuses_another_text_file(tmp_path):
    other = tmp_path / "book.txt"
    other.write_text("some text\n")
    with pytest.raises(UsageError, match="time_machine.txt"):
        bench.main([f"--e2e={other}"])


def _run_gpu_bench(tmp_path, *stages):
    """launch/gpu_bench.sh against a stand-in `python` that records its arguments (and fails
    the depth stage); returns (the finished process, the argv of every python call)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.jsonl"
    (fake_bin / "python").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if '--configs=depth' in sys.argv else 0)\n")
    (fake_bin / "python").chmod(0o755)
    workdir = tmp_path / "repo"
    (workdir / "deeprnn" / "data" / "texts").mkdir(parents=True)
    (workdir / "deeprnn" / "data" / "texts" / "time_machine.txt").write_text("text\n")
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    script = REPO / "launch" / "gpu_bench.sh"
    done = subprocess.run(["bash", script, *stages], cwd=workdir, env=env, capture_output=True,
                          text=True)
    argvs = ([json.loads(line) for line in calls.read_text().splitlines()]
             if calls.exists() else [])
    return done, argvs


def _json_names(argvs):
    return [next(a for a in argv if a.startswith("--json=")).split("/")[-1] for argv in argvs]


def test_gpu_bench_script_runs_every_stage_with_valid_bench_flags(tmp_path):
    """Every stage runs (a failing one does not stop the next), writes its JSON under $OUT,
    and passes flags that deeprnn.bench accepts; the big config is profiled in both dtypes and
    timed with cuDNN's kernel, and the seeds config is there."""
    done, argvs = _run_gpu_bench(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "=== depth failed" in done.stdout
    assert _json_names(argvs) == ["big_bf16.json", "big_fp32.json", "big_default.json",
                                  "d2l.json", "seeds.json", "mid.json", "depth.json",
                                  "e2e.json"]
    by_name = dict(zip(_json_names(argvs), argvs, strict=True))
    for argv in argvs:
        assert argv[:2] == ["-m", "deeprnn.bench"]
        bench.parse_options(argv[2:])  # a UsageError for an unknown or malformed flag
    for name in ("big_bf16", "big_fp32"):
        assert any(a.startswith("--profile=") for a in by_name[f"{name}.json"])
    assert "cudnn" in bench.parse_options(by_name["big_fp32.json"][2:]).impls
    assert bench.parse_options(by_name["big_default.json"][2:]).precision == "default"
    assert bench.parse_options(by_name["seeds.json"][2:]).configs == ["seeds"]
    assert "--e2e=deeprnn/data/texts/time_machine.txt" in by_name["e2e.json"]  # the packaged book


def test_gpu_bench_script_runs_only_the_stages_named(tmp_path):
    done, argvs = _run_gpu_bench(tmp_path, "seeds", "big_fp32")
    assert done.returncode == 0, done.stderr
    assert _json_names(argvs) == ["big_fp32.json", "seeds.json"]  # in the script's order


def test_each_row_reports_its_spread_and_a_busy_machine_is_said_so(monkeypatch):
    from deeprnn.bench import rows as bench_rows

    steady = iter([0.010, 0.0104, 0.010, 0.030, 0.0102])  # one slow repeat: still steady
    jumpy = iter([0.010, 0.013, 0.010, 0.013, 0.011])  # two groups
    timed = bench_rows.time_rows({"a": ({}, lambda: next(steady)),
                                  "b": ({}, lambda: next(jumpy))}, 5, "tiny")
    # Interquartile ranges by hand: a 10.0..10.4 -> 0.4 / 10.2; b 10.0..13.0 -> 3 / 11.
    assert timed["a"]["ms_per_step"] == pytest.approx(10.2)
    assert timed["a"]["spread"] == pytest.approx(0.4 / 10.2) and not timed["a"]["wide_spread"]
    assert timed["b"]["ms_per_step"] == pytest.approx(11.0)  # the median, not the mean
    assert timed["b"]["spread"] == pytest.approx(3 / 11) and timed["b"]["wide_spread"]
    assert bench_rows.machine_busy([1.5, 3.2], cores=2) and not bench_rows.machine_busy(
        [1.5, 1.9], cores=2)
    row = {"config": "d2l", "implementation": "fused", "dtype": "float32",
           "matmul_precision": "float32", "tokens_per_sec": 1.0, "compile_s": 0.1,
           "peak_mem_bytes": None, "loss_after_k": None, "ratio_vs_torch_d2l_loop": None}
    quiet = bench_rows.format_table([{**row, **timed["a"], "load": [1.0, 1.2],
                                      "busy_machine": False}])
    assert " 4% " in quiet and "BUSY" not in quiet and "!:" not in quiet
    busy = bench_rows.format_table([{**row, **timed["b"], "load": [1.0, 3.2],
                                     "busy_machine": True}])
    assert "27%!" in busy and "!: repeats spread over more than 10%" in busy
    assert "BUSY MACHINE while timing d2l: load average up to 3.2" in busy


def test_bench_rows_carry_their_repeats_load_and_spread(tmp_path):
    rows = bench.main(["--configs=tiny", "--impls=fused", "--repeats=3", "--steps=2",
                       "--steps_per_call=2", "--no_cache"])
    (row,) = rows
    assert len(row["ms_repeats"]) == 3 and min(row["ms_repeats"]) <= row["ms_per_step"]
    assert row["spread"] >= 0 and len(row["load"]) == 2 and isinstance(row["busy_machine"], bool)


def test_outputs_and_counts_are_checked_before_anything_is_timed(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused = {
        f"--json={tmp_path}": "is a folder",
        f"--json={a_file / 'out.json'}": "is a file, not a folder",
        f"--profile={a_file / 'prof'}": "is a file, not a folder",
        "--e2e_epochs=0": "--e2e_epochs must be at least 1",
        "--torch_threads=-1": "--torch_threads must be 0",
        "--impls=": "--configs and --impls must each name at least one",
        "--steps=3": "multiple of --steps_per_call=10",
    }
    for flag, message in refused.items():
        with pytest.raises(UsageError, match=message):
            bench.main(["--configs=tiny", "--impls=fused", flag])


def test_a_run_without_rows_leaves_earlier_results_as_they_were(tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "bench.json"
    earlier.write_text('[{"implementation": "fused"}]')
    argv = ["--configs=tiny", "--repeats=1", "--steps=2", "--steps_per_call=1",
            f"--json={earlier}"]
    if bench.jax.default_backend() != "gpu":  # no row of these can run on a CPU
        with pytest.raises(UsageError, match="none of --impls=cudnn runs here"):
            bench.main([*argv, "--impls=cudnn"])

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "prepare_row", fails)
    with pytest.raises(SystemExit) as stopped:
        bench.main([*argv, "--impls=fused,scratch"])
    assert stopped.value.code == 1
    assert "error: no row was timed" in capsys.readouterr().err
    assert earlier.read_text() == '[{"implementation": "fused"}]'


def test_json_is_valid_json_and_replaced_whole(tmp_path):
    out = tmp_path / "rows.json"
    bench._write_json(str(out), [{"train_perplexity": float("nan"), "ms": [1.0, float("inf")]}])
    assert json.loads(out.read_text(), parse_constant=pytest.fail) == [
        {"train_perplexity": None, "ms": [1.0, None]}]
    assert not (tmp_path / "rows.json.partial").exists()
