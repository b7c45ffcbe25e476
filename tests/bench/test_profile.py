"""--profile: the top-ops table read back from profiler traces (synthetic traces of each kind,
then real ones written by a tiny benchmark run on the CPU)."""

import pathlib

import pytest

from deeprnn.bench import cli as bench
from deeprnn.bench import profile


def _meta(pid, tid=None, process=None, thread=None):
    if process is not None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}


def _op(pid, tid, ts, dur, name, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def test_cpu_ops_count_their_own_time_and_nothing_else():
    """XLA:CPU: a while loop's body runs inside it on the same thread; other threads run ops
    of their own; events without hlo_op (PjRt, Python) are not ops."""
    events = [_meta(1, process="/host:CPU"), _meta(1, 7, thread="python"),
              _op(1, 7, 0, 200, "PjitFunction(step)"),
              _op(1, 8, 10, 100, "while.3", hlo_op="while.3"),
              _op(1, 8, 20, 30, "fusion.1", hlo_op="fusion.1"),
              _op(1, 8, 60, 40, "dot.2", hlo_op="dot.2"),
              _op(1, 9, 10, 50, "fusion.1", hlo_op="fusion.1")]
    own = sorted(profile.self_times(profile.device_op_events(events)))
    assert own == [("dot.2", 40.0), ("fusion.1", 30.0), ("fusion.1", 50.0), ("while.3", 30.0)]
    # 2 steps of 0.1 ms: per step fusion.1 ran once for 0.04 ms, and so on.
    rows = profile.top_ops(events, steps=2, ms_per_step=0.1, top=2)
    assert [r["name"] for r in rows] == ["fusion.1", "dot.2", "(other ops: 1)", "(no device op)"]
    assert rows[0]["count"] == 1 and rows[0]["ms"] == pytest.approx(0.04)
    assert rows[0]["share"] == pytest.approx(0.4)
    assert rows[2]["ms"] == pytest.approx(0.015)
    assert rows[3]["ms"] == pytest.approx(0.1 - 0.075)


def test_gpu_kernels_are_the_ops_and_host_launches_are_not():
    events = [_meta(1, process="/host:CPU"), _meta(2, process="/device:GPU:0"),
              _meta(2, 5, thread="Stream #13(Compute)"), _meta(2, 6, thread="Memcpy"),
              _op(1, 3, 0, 5, "launch fusion.1", hlo_op="fusion.1"),
              _op(2, 5, 10, 20, "loop_fusion_kernel", hlo_op="fusion.1"),
              _op(2, 5, 40, 30, "sm90_xmma_gemm"),
              _op(2, 6, 40, 9, "MemcpyD2H")]
    assert sorted((n, d) for n, _, _, _, d in profile.device_op_events(events)) == [
        ("fusion.1", 20.0), ("sm90_xmma_gemm", 30.0)]


def test_tpu_ops_come_from_the_xla_ops_line_only():
    events = [_meta(2, process="/device:TPU:0"), _meta(2, 1, thread="XLA Modules"),
              _meta(2, 2, thread="XLA Ops"), _meta(2, 3, thread="Steps"),
              _op(2, 1, 0, 100, "jit_step", hlo_module="jit_step"),
              _op(2, 2, 0, 60, "fusion.4", hlo_op="fusion.4"),
              _op(2, 3, 0, 100, "0")]
    assert [(n, d) for n, _, _, _, d in profile.device_op_events(events)] == [("fusion.4", 60.0)]


def test_torch_traces_use_kernels_or_else_aten_operators():
    cpu = [{"ph": "X", "cat": "cpu_op", "pid": 1, "tid": 1, "ts": 0, "dur": 50,
            "name": "aten::linear"},
           {"ph": "X", "cat": "cpu_op", "pid": 1, "tid": 1, "ts": 5, "dur": 40,
            "name": "aten::addmm"},
           {"ph": "X", "cat": "python_function", "pid": 1, "tid": 1, "ts": 0, "dur": 90,
            "name": "forward"}]
    assert sorted(profile.self_times(profile.device_op_events(cpu))) == [
        ("aten::addmm", 40.0), ("aten::linear", 10.0)]
    gpu = cpu + [{"ph": "X", "cat": "kernel", "pid": 0, "tid": 7, "ts": 9, "dur": 30,
                  "name": "ampere_sgemm"}]
    assert [(n, d) for n, _, _, _, d in profile.device_op_events(gpu)] == [
        ("ampere_sgemm", 30.0)]


def test_ops_are_described_from_the_compiled_hlo():
    name = "jit(run)/while/body/transpose(jvp(FusedDeepRNN))/tbh,tbg->hg/dot_general"
    hlo = "\n".join([
        "ENTRY %main {",
        "  %p = f32[8,4]{1,0} parameter(0)",
        "  %ynn_fusion.14 = f32[256,1024]{1,0} fusion(%a, %b), kind=kCustom, calls=%fc.14, "
        f'metadata={{op_name="{name}" stack_frame_id=1}}',
        "  ROOT %while.3 = (s32[], f32[2]{0}) while(%t), condition=%c, body=%b",
        "}"])
    described = profile.describe_ops(hlo)
    assert described["ynn_fusion.14"] == "f32[256,1024] fusion  tbh,tbg->hg/dot_general (bwd)"
    assert described["while.3"] == "(s32[], f32[2]) while"


def test_bench_profiles_every_row(tmp_path, capsys):
    impls = "fused,matmul-floor" + (",torch-tight" if bench.torch_available() else "")
    rows = bench.main(["--configs=tiny", f"--impls={impls}", "--repeats=1", "--steps=2",
                       "--steps_per_call=2", "--no_cache", f"--profile={tmp_path}"])
    out = capsys.readouterr().out
    for row in rows:
        prof = row["profile"]
        assert pathlib.Path(prof["trace"]).is_file()
        assert pathlib.Path(prof["trace"]).is_relative_to(tmp_path / "tiny")
        assert prof["ms_per_step"] > 0 and prof["ops"][-1]["name"] == "(no device op)"
        ops = [op for op in prof["ops"] if not op["name"].startswith("(")]
        assert ops and all(op["ms"] >= 0 and op["count"] > 0 for op in ops)
        assert f"tiny {row['implementation']}: top device ops per step" in out
    fused = rows[0]["profile"]["ops"]
    # The fused step's ops include its time loops and matmuls, described from the HLO.
    assert any(op.get("hlo", "").endswith("while") for op in fused)
    if bench.torch_available():
        assert any(op["name"].startswith("aten::") for op in rows[-1]["profile"]["ops"])
