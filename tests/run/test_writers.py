"""The run's writers: TensorBoard events (read back with TensorBoard's own loaders and a real
server), metrics.jsonl, summary.json, resume purging, gs:// workdirs, the progress line."""

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from etils import epath
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deeprnn.errors import UsageError
from deeprnn.run.console import ProgressLine, format_count, format_duration
from deeprnn.run.summary import UnreadableSummary, read_summary, summary_if_any, write_summary
from deeprnn.run.writers import RunWriter, read_metrics, write_text_whole

SAMPLE_TAG = "samples/time traveller"


def load_events(logdir) -> EventAccumulator:
    return EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def scalar_series(accumulator, tag) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def write_run(workdir, steps, *, loss_offset=0.0, resume_step=None, hparams=None):
    """Logs `train/loss = loss_offset + step` at each step, validation every 4th step."""
    with RunWriter(str(workdir), resume_step=resume_step) as writer:
        if hparams is not None:
            writer.hparams(hparams, ["validation/perplexity", "validation/bits_per_char"])
        for step in steps:
            writer.scalars(step, {"train/loss": loss_offset + step, "train/learning_rate": 2.0})
            if step > 0 and step % 4 == 0:
                writer.scalars(step, {"validation/perplexity": 100.0 / step})
                writer.texts(step, {SAMPLE_TAG: f"time traveller at {step}"})


def test_scalars_texts_and_hparams_read_back_with_tensorboard(tmp_path):
    write_run(tmp_path, range(1, 9), hparams={"cell": "lstm", "num_layers": 2, "lr": 2.0})

    events = load_events(tmp_path)
    assert scalar_series(events, "train/loss") == [(s, float(s)) for s in range(1, 9)]
    assert scalar_series(events, "validation/perplexity") == [(4, 25.0), (8, 12.5)]
    samples = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(SAMPLE_TAG)]
    assert samples == [(4, "time traveller at 4"), (8, "time traveller at 8")]
    assert set(events.PluginTagToContent("text")) == {SAMPLE_TAG}
    assert set(events.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }


def test_metrics_jsonl_has_one_record_per_step(tmp_path):
    write_run(tmp_path, range(1, 6))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[3]) == {
        "step": 4,
        "train/loss": 4.0,
        "train/learning_rate": 2.0,
        "validation/perplexity": 25.0,
    }
    assert [record["step"] for record in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_flush_makes_everything_durable_without_close(tmp_path):
    writer = RunWriter(str(tmp_path))
    writer.scalars(7, {"train/loss": 1.5})
    writer.texts(7, {SAMPLE_TAG: "abc"})
    writer.flush()  # What a run does after a checkpoint save; then it is killed.
    assert read_metrics(str(tmp_path)) == [{"step": 7, "train/loss": 1.5}]
    events = load_events(tmp_path)
    assert scalar_series(events, "train/loss") == [(7, 1.5)]
    assert events.Tags()["tensors"] == [SAMPLE_TAG]
    writer.close()


def test_resume_drops_later_records_and_tensorboard_shows_no_duplicates(tmp_path):
    write_run(tmp_path, range(1, 11))  # Crashed at step 10; its last checkpoint was step 6.
    with RunWriter(str(tmp_path), resume_step=6):
        # Dropped at once, so that a second crash before any flush leaves a clean file.
        assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    write_run(tmp_path, range(7, 13), loss_offset=100.0, resume_step=6)

    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["train/loss"] for r in records] == [*range(1, 7), *range(107, 113)]
    events = load_events(tmp_path)
    expected = [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
    assert scalar_series(events, "train/loss") == expected
    # The legacy EventAccumulator purges scalars only; the server's loader purges text too.
    text_events = plugin_event_accumulator.EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in text_events.Tensors(SAMPLE_TAG)] == [4, 8, 12]


def test_resume_from_no_checkpoint_drops_everything(tmp_path):
    write_run(tmp_path, range(0, 5))
    write_run(tmp_path, range(0, 3), loss_offset=50.0, resume_step=-1)
    assert [r["train/loss"] for r in read_metrics(str(tmp_path))] == [50.0, 51.0, 52.0]
    assert scalar_series(load_events(tmp_path), "train/loss") == [(0, 50.0), (1, 51.0), (2, 52.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with RunWriter(str(workdir), enabled=False, resume_step=3) as writer:
        writer.hparams({"lr": 1.0}, ["validation/perplexity"])
        writer.scalars(1, {"train/loss": 1.0})
        writer.texts(1, {SAMPLE_TAG: "x"})
        writer.flush()
    assert not workdir.exists()


def test_writer_without_tensorboard_keeps_metrics_and_imports_no_tensorboardx(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # any import of it now fails
    workdir = tmp_path / "run"
    with RunWriter(str(workdir), tensorboard=False) as writer:
        writer.hparams({"lr": 1.0}, ["validation/perplexity"])
        writer.scalars(1, {"train/loss": 2.5})
        writer.texts(1, {SAMPLE_TAG: "x"})
        writer.scalars(2, {"train/loss": 2.0})
    assert read_metrics(str(workdir)) == [{"step": 1, "train/loss": 2.5},
                                          {"step": 2, "train/loss": 2.0}]
    assert not [p for p in workdir.iterdir() if "tfevents" in p.name]


def test_tensorboard_writer_leaves_torch_unimported_but_importable(tmp_path):
    """tensorboardX's writer imports torch where installed (1.3 s of startup); a stand-in
    torch package first on the path shows whether the writer imported it, wherever this runs."""
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text("STAND_IN = True\n")
    run = tmp_path / "run"
    script = ("import sys\n"
              "from deeprnn.run.writers import RunWriter\n"
              f"writer = RunWriter({str(run)!r})\n"
              "writer.scalars(1, {'train/loss': 2.5})\n"
              "writer.close()\n"
              "assert 'torch' not in sys.modules, 'building the writer imported torch'\n"
              "import torch\n"
              "assert torch.STAND_IN\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "fake"), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [e.value for e in load_events(run).Scalars("train/loss")] == [2.5]


def test_summary_is_rewritten_atomically(tmp_path):
    write_summary(str(tmp_path), {"steps_done": 1, "best": {"validation/perplexity": 9.5}})
    write_summary(str(tmp_path), {"steps_done": 2, "devices": ("cpu:0",)})
    assert read_summary(str(tmp_path)) == {"steps_done": 2, "devices": ["cpu:0"]}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]  # no temporary file left behind


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    assert read_metrics(str(tmp_path)) == []
    with pytest.raises(UsageError, match="summary.json does not exist"):
        read_summary(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "trai\n{"step": 3}\n')
    with pytest.raises(UsageError, match="metrics.jsonl line 2 of 3 is not JSON"):
        read_metrics(str(tmp_path))


@pytest.mark.parametrize("content, match", [
    (b"", r"summary.json is empty: cut off or damaged; run the run's training command"),
    (b'{"steps_done": 4', r"summary.json is not JSON \(Expecting"),
    (b"\xff\xfe", r"summary.json is not UTF-8 text"),
    (b"[1, 2]", r"summary.json holds an array, not the JSON object a run writes"),
], ids=["empty", "cut_off", "binary", "a_list"])
def test_a_summary_that_is_not_a_json_object_is_unreadable(content, match, tmp_path):
    """A list used to pass (and crash the report with an AttributeError), the rest raised
    JSONDecodeError or UnicodeDecodeError."""
    (tmp_path / "summary.json").write_bytes(content)
    with pytest.raises(UnreadableSummary, match=match) as info:
        read_summary(str(tmp_path))
    assert "\n" not in str(info.value)
    assert summary_if_any(str(tmp_path)) is None  # what the launcher and a resume see


def test_a_failed_whole_write_names_the_file_not_its_temporary(tmp_path):
    """`evaluate --output=FOLDER` said `FOLDER.tmp-123: Is a directory`."""
    folder = tmp_path / "result.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        write_text_whole(epath.Path(folder), "{}")
    assert info.value.filename == str(folder)
    assert os.listdir(tmp_path) == ["result.json"]  # and no temporary file is left


def test_gcs_workdir_through_epath(tmp_path, fake_gcs):
    fake = fake_gcs
    workdir = "gs://bucket/sweep/run"
    with RunWriter(workdir) as writer:
        writer.scalars(1, {"train/loss": 3.0})
        writer.texts(1, {SAMPLE_TAG: "abc"})
        writer.flush()
        assert read_metrics(workdir) == [{"step": 1, "train/loss": 3.0}]
        writer.scalars(2, {"train/loss": 2.0})
        writer.scalars(3, {"train/loss": 1.0})
    write_run(workdir, [3, 4], loss_offset=10.0, resume_step=2)
    write_summary(workdir, {"steps_done": 4})

    assert read_summary(workdir) == {"steps_done": 4}
    assert [r["train/loss"] for r in read_metrics(workdir)] == [3.0, 2.0, 13.0, 14.0]
    local_copy = tmp_path / "events"
    local_copy.mkdir()
    for key in fake.find("gs://bucket/sweep/run"):
        if "tfevents" in key:
            (local_copy / os.path.basename(key)).write_bytes(fake.cat_file(key))
    events = load_events(local_copy)
    assert scalar_series(events, "train/loss") == [(1, 3.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert len(os.listdir(local_copy)) == 2  # one event file per session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(port, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.loads(response.read())


# The Python loader always works; the Rust one (tensorboard's default) when its binary exists.
LOADERS = ["false"] + (["true"] if importlib.util.find_spec("tensorboard_data_server") else [])


def test_tensorboard_server_lists_a_sweep(tmp_path):
    """A real `tensorboard --logdir=SWEEP_DIR` overlays the runs: their scalar and text tags,
    steps without duplicates after a resume, and the HParams dashboard's session groups."""
    write_run(tmp_path / "lstm", range(1, 9), hparams={"cell": "lstm", "lr": 2.0})
    write_run(tmp_path / "gru", range(1, 13), hparams={"cell": "gru", "lr": 1.0})
    write_run(tmp_path / "gru", range(9, 13), loss_offset=100.0, resume_step=8)
    servers = {}
    try:
        for load_fast in LOADERS:
            port = free_port()
            command = [
                *(sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path)),
                *("--host", "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}"),
            ]
            servers[port] = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        for port, server in servers.items():
            deadline = time.monotonic() + 12
            while True:
                assert server.poll() is None, "tensorboard exited"
                try:
                    text_tags = http_json(port, "/data/plugin/text/tags")
                    if set(text_tags) == {"lstm", "gru"}:
                        break
                except OSError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, "tensorboard did not load the runs in time"
                time.sleep(0.2)
            assert text_tags == {"lstm": [SAMPLE_TAG], "gru": [SAMPLE_TAG]}
            scalar_tags = http_json(port, "/data/plugin/scalars/tags")
            expected = {"train/loss", "train/learning_rate", "validation/perplexity"}
            assert {run: set(tags) for run, tags in scalar_tags.items()} == {
                "lstm": expected,
                "gru": expected,
            }
            series = http_json(port, "/data/plugin/scalars/scalars?run=gru&tag=train/loss")
            steps_and_values = [(step, value) for _, step, value in series]
            assert steps_and_values == [(s, float(s)) for s in range(1, 9)] + [
                (s, 100.0 + s) for s in range(9, 13)
            ]
            groups = http_json(
                port,
                "/data/plugin/hparams/session_groups",
                {
                    "experimentName": "",
                    "allowedStatuses": ["STATUS_SUCCESS", "STATUS_RUNNING", "STATUS_UNKNOWN"],
                    "colParams": [],
                    "startIndex": 0,
                    "sliceSize": 10,
                },
            )["sessionGroups"]
            by_cell = {group["hparams"]["cell"]: group for group in groups}
            assert set(by_cell) == {"lstm", "gru"}
            # The dashboard's metric column is the run's last validation/perplexity.
            (metric,) = by_cell["gru"]["metricValues"]
            assert metric["name"]["tag"] == "validation/perplexity"
            assert metric["value"] == pytest.approx(100.0 / 12)
    finally:
        for server in servers.values():
            server.kill()
            server.wait()


def test_progress_line_format_and_eta():
    now = [0.0]
    stream = io.StringIO()
    progress = ProgressLine(2000, stream=stream, every_s=1.0, clock=lambda: now[0])
    progress.update(100, {"train/loss": 2.5, "train/perplexity": 12.18})
    now[0] = 0.5
    progress.update(110, {"train/loss": 2.4})  # within every_s of the last line: not printed
    now[0] = 9.6
    metrics = {
        "train/loss": 2.3149,
        "train/perplexity": 10.123,
        "validation/perplexity": 9.84,
        "train/tokens_per_sec": 41234.0,
    }
    progress.update(120, metrics)
    now[0] = 10.0
    progress.update(121, {"train/loss": 2.2})  # validation is remembered from before
    progress.done()
    # 20 steps in 9.6 s, then 21 in 10 s: 1880 steps left take 902 s, then 1879 take 895 s.
    assert stream.getvalue().splitlines() == [
        "step 100/2000 [5%] loss 2.50 ppl 12.2 | eta --",
        "step 120/2000 [6%] loss 2.31 ppl 10.1 val 9.84 | 41.2k tok/s | eta 15m02s",
        "step 121/2000 [6%] loss 2.20 ppl 10.1 val 9.84 | 41.2k tok/s | eta 14m55s",
    ]


def test_progress_line_shows_the_final_step_once():
    stream = io.StringIO()
    progress = ProgressLine(16, stream=stream, every_s=1.0, clock=lambda: 0.0)
    progress.update(16, {"train/loss": 2.96})
    progress.done()
    assert stream.getvalue() == "step 16/16 [100%] loss 2.96 | eta 0s\n"


def test_progress_line_rewrites_itself_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    now = [0.0]
    stream = Terminal()
    progress = ProgressLine(10, stream=stream, every_s=0.0, clock=lambda: now[0])
    progress.update(1, {"train/loss": 12.5})
    now[0] = 1.0
    progress.update(10, {"train/loss": 1.0})
    progress.done()
    lines = stream.getvalue().split("\r")
    assert lines[1] == "step 1/10 [10%] loss 12.5 | eta --"
    # done() ends the line; the final step, already shown, is not drawn again.
    assert lines[2:] == ["step 10/10 [100%] loss 1.00 | eta 0s".ljust(len(lines[1])) + "\n"]


def test_duration_and_count_formats():
    assert [format_duration(s) for s in (0, 45.4, 192, 3720, 90061)] == [
        "0s",
        "45s",
        "3m12s",
        "1h02m",
        "25h01m",
    ]
    assert [format_count(v) for v in (950, 41234, 3.5e6, 2e9)] == ["950", "41.2k", "3.5M", "2.0G"]


def test_the_last_console_line_gives_held_out_scores_or_the_books_line():
    from types import SimpleNamespace

    from deeprnn.run.console import final_line

    cpu = SimpleNamespace(platform="cpu", id=0, device_kind="cpu")
    assert final_line({}, 1.0234, 61234.56, cpu) == \
        "perplexity 1.0, 61234.6 tokens/sec on cpu:0 (cpu)"
    held_out = {"validation/perplexity": 4.671, "validation/bits_per_char": 2.2235,
                "test/perplexity": 4.82, "test/bits_per_char": 2.269,
                "test/checkpoint_step": 2502}
    assert final_line(held_out, 3.9, 1000.0, cpu) == (
        "validation perplexity 4.67, 2.224 bits/char; test perplexity 4.82, 2.269 bits/char "
        "(best-validation step 2502); training perplexity 3.90; 1000.0 tokens/sec on cpu:0 "
        "(cpu)")
    seeds = {"test/perplexity": 4.8, "test/perplexity_std": 0.05, "test/bits_per_char": 2.26,
             "test/bits_per_char_std": 0.012}
    assert final_line(seeds, 3.9, 1.0, cpu).startswith(
        "test perplexity 4.80 ± 0.05, 2.260 ± 0.012 bits/char; training perplexity")
