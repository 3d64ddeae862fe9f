"""metrics.jsonl, TensorBoard event files (read back by TensorFlow), the progress line, curves."""

import io
import json
import struct

import pytest

from jaxssl import writers


def test_metrics_log_drops_steps_past_a_resume_and_lines_cut_by_a_kill(tmp_path):
    log = writers.MetricsLog(str(tmp_path / "metrics.jsonl"))
    assert log.read() == []
    for step in (0, 2, 4, 6):
        log.write({"step": step, "train/loss": 1.0 / (step + 1)})
    with open(log.path, "a") as f:
        f.write('{"step": 8, "train/lo')  # a kill in the middle of a write
    assert [r["step"] for r in log.read()] == [0, 2, 4, 6]
    log.truncate_after(4)
    assert [r["step"] for r in log.read()] == [0, 2, 4]
    log.write({"step": 6, "train/loss": 0.5})
    lines = open(log.path).read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4, 6]


def test_tensorboard_events_are_valid_tfrecords_read_by_tensorflow(tmp_path):
    tb = writers.TensorBoardWriter(str(tmp_path))
    tb.scalars(1, {"train/loss": 2.5, "eval/knn_top1": 0.25})
    tb.restart(2)
    tb.scalars(2, {"train/loss": 2.0})
    tb.close()
    from jaxssl.data.tf_import import tf

    (name,) = [p.name for p in tmp_path.iterdir()]
    assert name.startswith("events.out.tfevents.")
    events = [tf().compat.v1.Event.FromString(r.numpy())
              for r in tf().data.TFRecordDataset(str(tmp_path / name))]  # checks every CRC
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [(1, "train/loss", 2.5), (1, "eval/knn_top1", 0.25), (2, "train/loss", 2.0)]
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [2]


def test_tfrecord_framing_by_hand(tmp_path):
    tb = writers.TensorBoardWriter(str(tmp_path))
    tb.close()
    data = next(tmp_path.iterdir()).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert len(data) == 8 + 4 + length + 4  # header, its CRC, the event, its CRC


def test_progress_line_and_terminal_only_redraws():
    bar = writers.ProgressBar(100, 64, stream=io.StringIO())
    line = bar.line(25, 128.0, 3.14159)
    assert "step 25/100" in line and "128 img/s" in line and "loss 3.1416" in line
    assert "ETA 0:37" in line  # 75 steps x 64 images / 128 per second = 37.5 s
    assert "[######" in line
    bar.update(25, 128.0, 3.1)
    assert bar.stream.getvalue() == ""  # not a terminal: the trainer prints log lines instead
    assert writers.format_duration(3725) == "1:02:05"


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": 0, "eval/knn_top1": 0.2}, {"step": 5, "train/loss": 4.0},
               {"step": 10, "train/loss": 3.0, "eval/knn_top1": 0.4}]
    path = writers.plot_curves(records, str(tmp_path / "curves.png"))
    from PIL import Image

    assert Image.open(path).size == (1000, 360)


def test_progress_bar_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = writers.ProgressBar(10, 8, stream=Terminal(), interval=0.0)
    bar.update(3, 80.0, 2.0)
    bar.message("kNN top-1 0.5")
    bar.update(4, 80.0, 1.9)
    bar.close()
    text = bar.stream.getvalue()
    assert text.startswith("\r[") and "step 3/10" in text and "step 4/10" in text
    assert "\r\033[KkNN top-1 0.5\n" in text  # the message clears the bar's line first
    assert text.endswith("\n")
