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


def test_bench_rejects_unknown_config_and_repeated_rows():
    with pytest.raises(UsageError, match="--configs"):
        bench.main(["--configs=huge"])
    with pytest.raises(UsageError, match="--impls names fused twice"):
        bench.main(["--impls=fused,scratch,fused"])


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
    rows = bench.main([f"--e2e={SHARED_CORPORA / 'time_machine.txt'}", "--e2e_epochs=1",
                       f"--e2e_flagfile={recipe}", f"--json={tmp_path / 'e2e.json'}"])
    assert [r["implementation"] for r in rows] == (
        ["torch-d2l-train_ch8"] if bench.torch_available() else [])
    assert capsys.readouterr().err.count("--num_layers must be at least 1") == 2


def test_end_to_end_refuses_another_text_file(tmp_path):
    other = tmp_path / "book.txt"
    other.write_text("some text\n")
    with pytest.raises(UsageError, match="time_machine.txt"):
        bench.main([f"--e2e={other}"])


def test_gpu_bench_script_runs_every_stage_with_valid_bench_flags(tmp_path):
    """launch/gpu_bench.sh against a stand-in `python` that records its arguments: every
    stage runs (a failing one does not stop the next), writes its JSON under $OUT, and passes
    flags that deeprnn.bench accepts."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls.jsonl"
    (fake_bin / "python").write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if '--configs=depth' in sys.argv else 0)\n")
    (fake_bin / "python").chmod(0o755)
    workdir = tmp_path / "repo"
    (workdir / ".data").mkdir(parents=True)
    (workdir / ".data" / "time_machine.txt").write_text("text\n")
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    script = REPO / "launch" / "gpu_bench.sh"
    done = subprocess.run(["bash", script], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "=== depth failed" in done.stdout
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    names = [next(a for a in argv if a.startswith("--json=")).split("/")[-1] for argv in argvs]
    assert names == ["d2l.json", "depth.json", "big_fp32.json", "big_bf16.json", "e2e.json"]
    for argv in argvs:
        assert argv[:2] == ["-m", "deeprnn.bench"]
        bench.parse_options(argv[2:])  # a UsageError for an unknown or malformed flag
