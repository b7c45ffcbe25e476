"""deeprnn.bench end to end on a tiny config, in process (no subprocess start-up)."""

import json

import pytest

from deeprnn import bench
from deeprnn.errors import UsageError


def test_bench_writes_rows_with_equal_losses(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main(["--configs=tiny", "--impls=fused,scratch", f"--json={out}", "--repeats=2",
                       "--steps=4", "--steps_per_call=2", "--no_cache"])
    written = json.loads(out.read_text())
    assert [r["implementation"] for r in written] == ["fused", "scratch"]
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
    assert "fused" in capsys.readouterr().out


def test_bench_rejects_unknown_config():
    with pytest.raises(UsageError, match="--configs"):
        bench.main(["--configs=huge"])
