"""A run's files in a bucket: jaxssl.files on a fake gs:// (fsspec's in-memory filesystem under
the gs protocol, reached through etils.epath as a real bucket would be), and the trainer,
evaluation and export with a gs:// workdir writing nothing to the local disk.

Orbax's own gs:// support (tensorstore's GCS driver) needs the network; here the checkpoint
directory alone is mapped to a local folder, so everything else is seen going to the bucket.
"""

import json
import os
import struct

import fsspec
import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from jaxssl import checkpoint, evaluation, experiment, files, train, writers
from test_train import tiny_config


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def bucket(monkeypatch):
    from etils.epath import backend, gpath

    saved = {p: fsspec.registry.get(p) for p in FakeGCS.protocol}
    for p in FakeGCS.protocol:
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    # epath takes TensorFlow's gfile for gs:// wherever TensorFlow is installed; its fsspec
    # backend is what a host without TensorFlow (the GPU path) uses.
    monkeypatch.setenv("EPATH_USE_TF", "false")
    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    yield FakeGCS
    FakeGCS.store.clear()
    from fsspec.registry import _registry

    for p, impl in saved.items():
        if impl is None:
            _registry.pop(p, None)  # gcsfs's lazy entry in known_implementations comes back
        else:
            fsspec.register_implementation(p, impl, clobber=True)
    gpath._is_tf_installed.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()


def stored(bucket_fs) -> dict[str, bytes]:
    """What the bucket holds: {"bucket/path": bytes}."""
    return {k.removeprefix("gs://").lstrip("/"): v.getvalue() for k, v in bucket_fs.store.items()}


def test_paths():
    assert files.resolve("gs://b/run/") == "gs://b/run"
    assert files.resolve("~/x").startswith("/") and "~" not in files.resolve("~/x")
    assert files.join("gs://b/run", "eval", "knn.json") == "gs://b/run/eval/knn.json"
    assert files.dirname("gs://b/run/eval/knn.json") == "gs://b/run/eval"
    assert files.is_remote("s3://b/x") and not files.is_remote("/gs:/b")


def test_remote_files_round_trip(bucket):
    files.makedirs("gs://b/run")
    files.write_text("gs://b/run/config.json", '{"a": 1}')
    assert files.read_text("gs://b/run/config.json") == '{"a": 1}'
    assert files.isfile("gs://b/run/config.json") and files.isdir("gs://b/run")
    assert not files.exists("gs://b/run/missing.json")
    contents = files.append_text("gs://b/run/log.txt", "1\n")
    contents = files.append_text("gs://b/run/log.txt", "2\n", current=contents)
    assert files.read_text("gs://b/run/log.txt") == contents == "1\n2\n"
    assert files.listdir("gs://b/run") == ["config.json", "log.txt"]
    files.remove("gs://b/run/log.txt")
    assert files.listdir("gs://b/run") == ["config.json"]
    assert set(stored(bucket)) == {"b/run/config.json"}


def test_local_write_is_atomic_and_leaves_no_temporary(tmp_path):
    os.makedirs(tmp_path / "sub")
    path = str(tmp_path / "sub" / "x.bin")
    files.write_bytes(path, b"old")
    files.write_bytes(path, b"new")
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path / "sub") == ["x.bin"]
    with pytest.raises(IsADirectoryError):
        files.write_bytes(str(tmp_path / "sub"), b"x")


def test_metrics_log_and_tensorboard_in_a_bucket(bucket):
    log = writers.MetricsLog("gs://b/run/metrics.jsonl")
    log.truncate_after(-1)
    for step in (0, 2, 4, 6):
        log.write({"step": step, "train/loss": 1.0 / (step + 1)})
    first = stored(bucket)["b/run/metrics.jsonl"]
    # A resume after step 4 writes its own object (an upload rewrites one segment, never the
    # run's whole log); reading joins them, the resumed step 6 replacing the first run's.
    again = writers.MetricsLog("gs://b/run/metrics.jsonl")
    again.truncate_after(4)
    again.write({"step": 6, "train/loss": 0.5})
    again.write({"step": 8, "train/loss": 0.25})
    assert [(r["step"], r["train/loss"]) for r in again.read()] == [
        (0, 1.0), (2, 1 / 3), (4, 0.2), (6, 0.5), (8, 0.25)]
    assert stored(bucket)["b/run/metrics.jsonl"] == first
    assert stored(bucket)["b/run/metrics-from-4.jsonl"].count(b"\n") == 2
    # An evaluation added to an earlier segment's record (a stop during the monitor).
    again.update(4, {"eval/knn_top1": 0.3})
    assert again.read()[2] == {"step": 4, "train/loss": 0.2, "eval/knn_top1": 0.3}
    # A resume from an older checkpoint (step 2): the segment from 4 goes.
    third = writers.MetricsLog("gs://b/run/metrics.jsonl")
    third.truncate_after(2)
    third.write({"step": 4, "train/loss": 0.125})
    assert [(r["step"], r["train/loss"]) for r in third.read()] == [
        (0, 1.0), (2, 1 / 3), (4, 0.125)]
    assert "b/run/metrics-from-4.jsonl" not in stored(bucket)
    # A fresh start keeps nothing.
    writers.MetricsLog("gs://b/run/metrics.jsonl").truncate_after(-1)
    assert third.read() == [] and sorted(stored(bucket)) == ["b/run/metrics.jsonl"]

    tb = writers.TensorBoardWriter("gs://b/run/tensorboard")
    tb.scalars(1, {"train/loss": 2.5})
    tb.scalars(2, {"train/loss": 2.0})
    tb.close()
    (name,) = files.listdir("gs://b/run/tensorboard")
    data = files.read_bytes(f"gs://b/run/tensorboard/{name}")
    from tensorboard.compat.proto import event_pb2

    events, at = [], 0
    while at < len(data):  # TFRecord framing: length, its CRC, the event, its CRC
        (length,) = struct.unpack("<Q", data[at:at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    assert [(e.step, v.simple_value) for e in events for v in e.summary.value] == [
        (1, 2.5), (2, 2.0)]


@pytest.fixture
def local_checkpoints(monkeypatch, tmp_path):
    """Orbax's directory alone goes to a local folder (its gs:// driver needs the network); it
    still creates the bucket folder, as orbax does on a real bucket."""
    real = checkpoint.Checkpointer

    def mapped(directory, *args, **kwargs):
        assert directory.startswith("gs://b/"), directory
        files.makedirs(directory)
        return real(str(tmp_path / "ckpt" / directory[len("gs://"):]), *args, **kwargs)

    monkeypatch.setattr(train, "Checkpointer", mapped)
    monkeypatch.setattr(experiment, "Checkpointer", mapped)


def test_train_eval_and_export_with_a_gs_workdir(bucket, local_checkpoints, tmp_path,
                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local folder named "gs:" would show up here
    config = tiny_config(("num_steps", "6"), ("eval_every_steps", "6"))
    first = train.train(config, "gs://b/run", stop_at_step=3)
    assert first.status == "stopped"
    result = train.train(config, "gs://b/run/")  # resumes from the bucket's files
    assert result.status == "done" and result.step == 6
    assert not os.path.exists(tmp_path / "gs:")
    names = set(stored(bucket))
    for name in ("config.json", "data.json", "metrics.jsonl", "augment_preview.png",
                 "curves.png"):
        assert f"b/run/{name}" in names, sorted(names)
    assert sum(n.startswith("b/run/tensorboard/events.out.tfevents.") for n in names) == 2
    assert "b/run/metrics-from-3.jsonl" in names  # the resumed segment's own object
    records = writers.MetricsLog("gs://b/run/metrics.jsonl").read()
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    assert records[-1]["eval/knn_top1"] == pytest.approx(result.knn_top1)
    assert stored(bucket)["b/run/curves.png"].startswith(b"\x89PNG")
    assert json.loads(stored(bucket)["b/run/data.json"])["image_size"] == 16

    from jaxssl import configuration

    saved, ignored = configuration.load_workdir_config("gs://b/run")
    assert not ignored and saved.num_steps == 6
    record = evaluation.evaluate("knn", saved, "gs://b/run")
    assert record["top1"] == pytest.approx(result.knn_top1)
    assert json.loads(stored(bucket)["b/run/eval/knn.json"])["step"] == 6
    assert "b/run/eval/knn_step6.json" in stored(bucket)
    out = evaluation.export(saved, "gs://b/run", "gs://b/exports/backbone.msgpack",
                            fmt="msgpack")
    assert out == "gs://b/exports/backbone.msgpack"
    from jaxssl import export as export_lib

    params, batch_stats, metadata = export_lib.load_msgpack(out)
    assert metadata["step"] == "6"
    want = jax.device_get((result.state.params["backbone"], result.state.batch_stats["backbone"]))
    for a, b in zip(jax.tree.leaves((params, batch_stats)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(tmp_path / "gs:")


def test_transient_bucket_errors_are_retried(bucket, local_checkpoints, tmp_path, monkeypatch):
    """Before: one failed upload of metrics.jsonl (a 503) ended the run. Here every third
    upload fails once; the run goes on and its files are whole."""
    monkeypatch.setattr(files, "RETRY_DELAYS", (0.0, 0.0))
    real_open, calls = FakeGCS._open, []

    def flaky(self, path, mode="rb", *args, **kwargs):
        if "w" in mode:
            calls.append(path)
            if len(calls) % 3 == 0:
                raise OSError("503 Service Unavailable: backend error")
        return real_open(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(FakeGCS, "_open", flaky)
    monkeypatch.chdir(tmp_path)
    result = train.train(tiny_config(("num_steps", "4"), ("eval.knn", "false")), "gs://b/run")
    assert result.status == "done" and result.step == 4
    assert len(calls) >= 9  # uploads failed, and were tried again
    records = writers.MetricsLog("gs://b/run/metrics.jsonl").read()
    assert [r["step"] for r in records] == [2, 4]
    assert json.loads(stored(bucket)["b/run/config.json"])["num_steps"] == 4
    # An error that a retry cannot cure is not retried.
    monkeypatch.setattr(files, "RETRY_DELAYS", (60.0,))
    with pytest.raises(FileNotFoundError):
        files.read_bytes("gs://b/run/no_such_object")


def test_an_unwritable_bucket_is_one_line(bucket, monkeypatch, capsys):
    def refuse(self, *args, **kwargs):
        raise PermissionError("403 Forbidden: caller does not have storage.objects.create")

    monkeypatch.setattr(FakeGCS, "_open", refuse)
    from jaxssl import cli

    assert cli.main(["train", "--config", "demo", "--workdir", "gs://b/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot write to workdir gs://b/run" in err and "403 Forbidden" in err, err
