"""log.wandb_project: a Weights & Biases run (offline here) holding what metrics.jsonl holds,
the config and the PNGs, continued by a resume; a one-line ConfigError without wandb."""

import glob
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
from PIL import Image

from jaxssl import configuration, files, train, writers
from jaxssl.configuration import ConfigError

from test_files import bucket  # noqa: F401 (the fake gs:// fixture)
from test_train import tiny_config


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header
    (CRC, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes are padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                chunks.append(pending)
    return [wandb_internal_pb2.Record.FromString(c) for c in chunks]


def offline_run(folder):
    """(run record, [history rows as dicts]) of one offline run folder, once complete."""
    import wandb

    # wandb's service process writes the file after finish() returns (measured: 4 times in 15
    # an empty file just after finish); teardown ends the service, which writes it first.
    wandb.teardown()
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    for _ in range(100):
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    return run, history


def of_run(folder, run_id):
    """Whether `folder` is wandb's offline-run-<time>-<id>, or -<id>-<n> for a second start of
    that run within the same second."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?",
                        os.path.basename(folder)) is not None


@pytest.fixture
def offline(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    # wandb reads the environment once per process (wandb.setup); each test reads its own.
    wandb.teardown()
    yield
    wandb.teardown()


def test_a_run_and_its_resume_log_every_metric_to_one_wandb_run(offline, tmp_path):
    workdir = str(tmp_path / "run")
    project = ("log.wandb_project", "jaxssl-test")
    first = train.train(tiny_config(project), workdir, stop_at_step=5)
    assert first.status == "stopped"
    run_id = open(os.path.join(workdir, writers.WANDB_RUN_ID)).read()
    # Resume from the checkpoint at step 3, not 5: step 4 was logged to wandb by the first run
    # and is logged again by the second (wandb cannot rewind).
    shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))
    second = train.train(tiny_config(project, ("log.wandb_name", "tiny")), workdir)
    assert second.status == "done" and second.step == 12
    assert open(os.path.join(workdir, writers.WANDB_RUN_ID)).read() == run_id

    # One offline folder per invocation, both of the same run, in WORKDIR/wandb/.
    folders = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(folders) == 2 and all(of_run(f, run_id) for f in folders)
    (run1, rows1), (run2, rows2) = map(offline_run, folders)
    assert run1.run_id == run2.run_id == run_id and run1.project == "jaxssl-test"
    assert run2.display_name == "tiny"
    config = {u.key: json.loads(u.value_json) for u in run2.config.update}
    assert config["method"] == "simclr" and config["num_steps"] == 12
    assert config["log"]["wandb_project"] == "jaxssl-test"

    # Every value of metrics.jsonl, against "step": the second run's rows replace the first's
    # from its checkpoint on.
    logged = {}
    for rows, start in ((rows1, 0), (rows2, 3)):
        rows = [{k: v for k, v in r.items() if not k.startswith(("_", "images/"))}
                for r in rows]
        rows = [r for r in rows if set(r) != {"step"}]  # a picture's row
        assert all(r["step"] > start for r in rows if "train/loss" in r)
        for step in {r["step"] for r in rows}:
            logged[step] = {}
        for r in rows:
            logged[r["step"]].update(r)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        expected = [json.loads(line) for line in f]
    assert sorted(logged) == [r["step"] for r in expected] == [0, 2, 4, 6, 8, 10, 12]
    for record in expected:
        assert logged[record["step"]] == pytest.approx(record, rel=1e-12)
    assert {"eval/knn_top1", "eval/rankme", "train/loss"} <= set(logged[12])

    # The pictures: the augmentation preview at the start, curves.png at each end, as PNGs in
    # the run's files (an image's fields are logged as images/<name>/<field>).
    pictures = [(r["step"], k.removesuffix("/_type"), r[k]) for rows in (rows1, rows2)
                for r in rows for k in r if k.startswith("images/") and k.endswith("/_type")]
    assert pictures == [(0, "images/augment_preview", "image-file"),
                        (5, "images/curves", "image-file"), (12, "images/curves", "image-file")]
    for folder, rows, name in ((folders[0], rows1, "augment_preview"),
                               (folders[1], rows2, "curves")):
        (path,) = [r[f"images/{name}/path"] for r in rows if f"images/{name}/path" in r]
        with open(os.path.join(folder, "files", path), "rb") as a, \
                open(os.path.join(workdir, f"{name}.png"), "rb") as b:
            assert a.read() == b.read()


def test_without_wandb_a_one_line_config_error_before_the_workdir_is_touched(
        monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[wandb\]'") as e:
        train.train(tiny_config(("log.wandb_project", "p")), str(workdir))
    assert "\n" not in str(e.value) and not workdir.exists()


def test_a_wandb_refusal_at_start_up_is_a_one_line_config_error(offline, monkeypatch, tmp_path):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    wandb.teardown()  # read the environment again
    with pytest.raises(ConfigError, match="wandb could not start a run") as e:
        writers.WandbWriter(str(tmp_path), project="p")
    assert "\n" not in str(e.value) and "wandb login" in str(e.value)
    assert not (tmp_path / writers.WANDB_RUN_ID).exists()


def test_wandb_fields_are_checked_and_free_on_resume():
    config = tiny_config(("log.wandb_name", "x"))
    with pytest.raises(ConfigError, match="log.wandb_project"):
        configuration.validate(config)
    assert "log.wandb_project".startswith(train._FREE_FIELDS)


def test_a_bucket_workdir_keeps_the_run_id_there_and_wandb_files_in_the_local_cache(
        offline, bucket, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    workdir = "gs://bucket/runs/a"
    local = writers.wandb_dir(workdir)
    assert local == str(tmp_path / "cache/jaxssl/wandb/gs/bucket/runs/a")
    assert writers.wandb_dir(str(tmp_path / "w")) == str(tmp_path / "w")
    png = io.BytesIO()
    Image.new("RGB", (4, 3)).save(png, format="png")
    files.write_bytes(f"{workdir}/curves.png", png.getvalue())
    ids = []
    for step in (1, 2):
        wb = writers.WandbWriter(workdir, project="p")
        wb.scalars(step, {"train/loss": 1.0 / step})
        wb.image(step, "images/curves", f"{workdir}/curves.png")
        wb.close()
        ids.append(files.read_text(f"{workdir}/{writers.WANDB_RUN_ID}"))
    assert ids[0] == ids[1] == wb.id
    folders = sorted(glob.glob(os.path.join(local, "wandb", "offline-run-*")))
    assert len(folders) == 2 and all(of_run(f, wb.id) for f in folders)
    _, rows = offline_run(folders[1])
    assert [(r["step"], r.get("train/loss"), r.get("images/curves/width")) for r in rows] == \
        [(2, 0.5, None), (2, None, 4)]


def test_nothing_imports_wandb_unless_a_project_is_set():
    code = ("import sys, jaxssl.cli, jaxssl.train, jaxssl.writers; "
            "assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
