"""What a run writes for people: metrics.jsonl, TensorBoard events, a progress bar, curves.png,
and, where the config names a project, a Weights & Biases run.

None of it needs TensorFlow: TensorBoard event files are written here from tensorboard's
protobufs (the TFRecord framing is 16 bytes around each record). wandb is imported only by
`WandbWriter`, made only when log.wandb_project is set.
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

__all__ = ["MetricsLog", "TensorBoardWriter", "open_tensorboard", "WandbWriter",
           "require_wandb", "wandb_dir", "WANDB_RUN_ID", "ProgressBar", "plot_curves",
           "format_duration"]


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step ({"step": ..., "train/loss": ...}).

    `path` may be remote (see jaxssl.files). An object in a bucket cannot be appended to, so
    each write uploads the object again: there every run segment (each resume, from
    `truncate_after(step)`) writes its own object, `metrics-from-<step>.jsonl` beside
    `metrics.jsonl`, and `read()` joins them, a later segment replacing what an earlier one
    logged past its start. An upload rewrites one segment, never the whole run's log."""

    def __init__(self, path: str):
        self.path = path
        self._segment = path  # the object this run appends to (remote)
        self._text: str | None = None  # the segment's contents, known after a remote write

    def _segments(self) -> list[tuple[int, str]]:
        """[(start step, path)] of the objects of a remote log, by start."""
        folder, _, name = self.path.rpartition("/")
        stem = name.removesuffix(".jsonl")
        found = [(0, self.path)] if files.exists(self.path) else []
        if files.isdir(folder):
            for other in files.listdir(folder):
                start = other.removeprefix(f"{stem}-from-").removesuffix(".jsonl")
                if other.startswith(f"{stem}-from-") and start.isdigit():
                    found.append((int(start), f"{folder}/{other}"))
        return sorted(found)

    def _segment_path(self, start: int) -> str:
        return self.path if start == 0 else (
            f"{self.path.removesuffix('.jsonl')}-from-{start}.jsonl")

    @staticmethod
    def _parse(text: str) -> list[dict[str, Any]]:
        records = []
        for line in text.splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill: drop it
                    continue
        return records

    def read(self) -> list[dict[str, Any]]:
        if not files.is_remote(self.path):
            return self._parse(files.read_text(self.path)) if files.exists(self.path) else []
        records = []
        for start, path in self._segments():
            records = [r for r in records if r.get("step", 0) <= start]
            records += self._parse(files.read_text(path))
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (written by a run that stopped past its last
        checkpoint), so a resumed run's log reads as one uninterrupted run; -1 drops them all.
        In a bucket, the records from here on go to a new segment (segments that start at or
        after `step` held only records after it, and are removed)."""
        if not files.is_remote(self.path) or step <= 0:
            if files.is_remote(self.path):
                for start, path in self._segments():
                    if start > 0:
                        files.remove(path)
            records = [r for r in self.read() if r.get("step", 0) <= step]
            self._text = "".join(json.dumps(r) + "\n" for r in records)
            files.write_text(self.path, self._text)
            self._segment = self.path
            return
        for start, path in self._segments():
            if start >= step and path != self.path:
                files.remove(path)
        self._segment, self._text = self._segment_path(step), ""

    def update(self, step: int, values: dict[str, Any]) -> None:
        """Add `values` to the record of `step` (a new record at the end if there is none)."""
        if not files.is_remote(self.path):
            places = [(0, self.path)]
        else:
            places = [(s, p) for s, p in self._segments() if s <= step] or [(0, self._segment)]
        for _, path in reversed(places):
            records = self._parse(files.read_text(path)) if files.exists(path) else []
            for r in records:
                if r.get("step") == step:
                    r.update(values)
                    files.write_text(path, "".join(json.dumps(x) + "\n" for x in records))
                    if path == self._segment:
                        self._text = None
                    return
        self.write({"step": step, **values})

    def write(self, record: dict[str, Any]) -> None:
        self._text = files.append_text(self._segment, json.dumps(record) + "\n",
                                       current=self._text)


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


# The workdir's file holding the id of its wandb run: a resume continues that run.
WANDB_RUN_ID = "wandb_run_id"
# wandb's x-axis for every logged value: the training step, logged as a value (wandb's own
# `_step` counts log calls and never goes back; a resume from an earlier checkpoint does).
WANDB_STEP = "step"


def require_wandb() -> None:
    """ConfigError (one line) unless wandb can be imported."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        from jaxssl.configuration import ConfigError

        raise ConfigError("log.wandb_project is set but wandb is not installed: "
                          "pip install -e '.[wandb]' (or pip install wandb), or unset "
                          "log.wandb_project") from e


def wandb_dir(workdir: str) -> str:
    """The local folder wandb writes under (its files go to `<folder>/wandb/`): the workdir
    itself, or for a workdir in a bucket (wandb writes only local files) a folder named after
    it under $XDG_CACHE_HOME or ~/.cache: `jaxssl/wandb/gs/bucket/path`."""
    if not files.is_remote(workdir):
        return workdir
    scheme, _, rest = workdir.partition("://")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxssl", "wandb", scheme, *rest.strip("/").split("/"))


class WandbWriter:
    """The same scalars as metrics.jsonl, the config and pictures in a Weights & Biases run.

    The run's id is kept in `<workdir>/wandb_run_id`, and a resume continues that run
    (resume="allow"). Every value is plotted against WANDB_STEP, the training step logged as a
    value: wandb cannot rewind, so the steps a stopped run logged past its last checkpoint
    appear twice after a resume (metrics.jsonl keeps the resumed run's only). Made by process
    0 alone. A wandb error at start-up (no API key, say) is a one-line ConfigError.
    """

    def __init__(self, workdir: str, *, project: str, entity: str = "", name: str = "",
                 config: dict[str, Any] | None = None):
        require_wandb()
        import wandb

        from jaxssl.configuration import ConfigError, _one_line

        self._wandb = wandb
        id_path = files.join(workdir, WANDB_RUN_ID)
        run_id = files.read_text(id_path).strip() if files.exists(id_path) else None
        local = wandb_dir(workdir)
        os.makedirs(local, exist_ok=True)
        try:
            self._run = wandb.init(project=project, entity=entity or None, name=name or None,
                                   id=run_id, resume="allow", dir=local, config=config,
                                   allow_val_change=True)
        except wandb.errors.Error as e:
            raise ConfigError(f"wandb could not start a run in project {project!r}: "
                              f"{_one_line(e)} (or run with WANDB_MODE=offline and `wandb "
                              "sync` later)") from e
        self.id = self._run.id
        if run_id is None:
            files.write_text(id_path, self.id)
        self._run.define_metric(WANDB_STEP)
        self._run.define_metric("*", step_metric=WANDB_STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({WANDB_STEP: step, **{k: float(v) for k, v in values.items()}})

    def image(self, step: int, name: str, path: str) -> None:
        """The PNG at `path` (local or in a bucket) as the image `name` of `step`."""
        picture = path
        if files.is_remote(path):  # wandb copies local files only
            from PIL import Image

            picture = Image.open(io.BytesIO(files.read_bytes(path)))
        self._run.log({WANDB_STEP: step, name: self._wandb.Image(picture)})

    def flush(self) -> None:
        """Nothing to do: wandb's own process writes (and uploads) as values come."""

    def close(self, exit_code: int = 0) -> None:
        """End the run; a non-zero `exit_code` marks it failed (a resume continues it)."""
        self._run.finish(exit_code=exit_code)


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
    """curves.png: train/loss and eval/knn_top1 against steps, and the collapse measures
    (eval/rankme, eval/feature_std; train/embedding_std for the two-view methods;
    train/alignment, train/uniformity for contrastive methods)
    where the records have them. Returns the path, or None when matplotlib is missing (the
    caller says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # The loss and kNN always; the collapse measures where the run logged them.
    names = ["train/loss", "eval/knn_top1"] + [
        name for name in ("eval/rankme", "eval/feature_std", "train/embedding_std",
                          "train/alignment", "train/uniformity")
        if any(name in r for r in records)]
    cols = 2 if len(names) <= 2 else 3 if len(names) <= 6 else 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        points = [(r["step"], r[names[i]]) for r in records if names[i] in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(names[i])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    files.write_bytes(path, png.getvalue())
    return path
