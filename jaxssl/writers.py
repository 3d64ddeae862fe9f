"""What a run writes for people: metrics.jsonl, TensorBoard events, a progress bar, curves.png.

None of it needs TensorFlow: TensorBoard event files are written here from tensorboard's
protobufs (the TFRecord framing is 16 bytes around each record).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, TextIO

from jaxssl import files

__all__ = ["MetricsLog", "TensorBoardWriter", "open_tensorboard", "ProgressBar", "plot_curves",
           "format_duration"]


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step ({"step": ..., "train/loss": ...}).

    `path` may be remote (see jaxssl.files): there each write uploads the whole file again,
    from the copy kept here."""

    def __init__(self, path: str):
        self.path = path
        self._text: str | None = None  # the file's contents, known after a remote write

    def read(self) -> list[dict[str, Any]]:
        if not files.exists(self.path):
            return []
        records = []
        for line in files.read_text(self.path).splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill: drop it
                    continue
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that stopped past its last
        checkpoint), so a resumed run's log reads as one uninterrupted run."""
        records = [r for r in self.read() if r.get("step", 0) <= step]
        self._text = "".join(json.dumps(r) + "\n" for r in records)
        files.write_text(self.path, self._text)

    def update(self, step: int, values: dict[str, Any]) -> None:
        """Add `values` to the record of `step` (a new record at the end if there is none)."""
        records = self.read()
        for r in records:
            if r.get("step") == step:
                r.update(values)
                break
        else:
            records.append({"step": step, **values})
        self._text = "".join(json.dumps(r) + "\n" for r in records)
        files.write_text(self.path, self._text)

    def write(self, record: dict[str, Any]) -> None:
        self._text = files.append_text(self.path, json.dumps(record) + "\n", current=self._text)


def _masked_crc32c(data: bytes) -> int:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    return masked_crc32c(data)


class TensorBoardWriter:
    """Scalar summaries in a TensorBoard event file under `logdir`."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = files.join(logdir, name)
        if files.is_remote(logdir):
            # An object cannot be appended to: the events are kept here and uploaded whole
            # at every flush (scalars only: kilobytes).
            self._file, self._remote = io.BytesIO(), True
        else:
            files.makedirs(logdir)
            self._file, self._remote = open(self.path, "ab"), False
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + data
                         + struct.pack("<I", _masked_crc32c(data)))

    def restart(self, step: int) -> None:
        """Mark a resume at `step`: TensorBoard discards earlier files' points after it."""
        log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._write(self._event_pb2.Event(wall_time=time.time(), step=step, session_log=log))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.flush()

    def flush(self) -> None:
        if self._remote:
            files.write_bytes(self.path, self._file.getvalue())
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


def open_tensorboard(logdir: str) -> TensorBoardWriter | None:
    """A TensorBoardWriter, or None where the tensorboard package (whose protobufs the events
    are) is not installed, as on a GPU host without the TensorFlow stack."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    return TensorBoardWriter(logdir)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """One line on a terminal, redrawn at most every `interval` seconds: step, images/s, loss,
    ETA. Off a terminal (a log file), it prints nothing and `line` is used by the trainer."""

    def __init__(self, total: int, batch_size: int, *, stream: TextIO | None = None,
                 interval: float = 0.25):
        self.total, self.batch_size, self.interval = total, batch_size, interval
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def line(self, step: int, images_per_sec: float | None, loss: float | None) -> str:
        width = 24
        done = int(width * step / max(self.total, 1))
        rate = f"{images_per_sec:,.0f} img/s" if images_per_sec else "- img/s"
        loss_text = f"loss {loss:.4f}" if loss is not None else "loss -"
        eta = "?"
        if images_per_sec and step < self.total:
            eta = format_duration((self.total - step) * self.batch_size / images_per_sec)
        elif step >= self.total:
            eta = "0:00"
        return (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  {rate}  "
                f"{loss_text}  ETA {eta}")

    def update(self, step: int, images_per_sec: float | None, loss: float | None,
               force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.stream.write("\r" + self.line(step, images_per_sec, loss) + "\033[K")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line of text above the bar."""
        if self.live:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        self._last = 0.0

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def plot_curves(records: list[dict[str, Any]], path: str) -> str | None:
    """curves.png: train/loss and eval/knn_top1 against steps. Returns the path, or None when
    matplotlib is missing (the caller says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    loss = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    knn = [(r["step"], r["eval/knn_top1"]) for r in records if "eval/knn_top1" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, points, title in ((axes[0], loss, "train/loss"), (axes[1], knn, "eval/knn_top1")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    files.write_bytes(path, png.getvalue())
    return path
