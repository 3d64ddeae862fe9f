"""Record shards (`jaxssl prepare`, data.source="records"): round trip, the decode-and-crop path,
resumable prepare, training from records (exact resume after kill -9), buckets, bad input.

One module-scoped folder of 180 small images of varied sizes and modes (RGB, grayscale and
CMYK JPEGs, an EXIF-rotated JPEG, RGB and RGBA PNGs) in three class folders, plus two bad files,
is prepared once and shared.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxssl import cli, configuration, train
from jaxssl.data import pipeline, records, recipes, sources
from test_files import bucket  # noqa: F401 (a fixture)
from test_train import TINY, assert_same_state, records_without_timing

CLASSES = ("ant", "bee", "cow")


def _make_folder(root, n=180):
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(root / c, exist_ok=True)
    for i in range(n):
        c = CLASSES[i % 3]
        h, w = (int(v) for v in rng.integers(20, 72, 2))
        # Smooth content with noise: JPEG artefacts and chroma subsampling matter.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(yy * (3 + i % 5)) % 256, (xx * (2 + i % 7)) % 256,
                         ((yy + xx) * 4) % 256], -1)
        a = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
        kind = i % 9
        path = root / c / f"{i:03d}"
        if kind == 0:
            im.save(f"{path}.png")
        elif kind == 1:
            im.convert("RGBA").save(f"{path}.png")
        elif kind == 2:
            im.convert("L").save(f"{path}.jpg", quality=90)
        elif kind == 3:
            im.convert("CMYK").save(f"{path}.jpg")
        elif kind == 4:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated: decode_rgb turns it upright
            im.save(f"{path}.jpg", exif=exif)
        elif kind == 5:
            im.save(f"{path}.jpg", quality=75, progressive=True)
        else:
            im.save(f"{path}.jpg", quality=85, subsampling=2 if kind == 6 else 0)
    (root / "ant" / "truncated.jpg").write_bytes((root / "ant" / "006.jpg").read_bytes()[:200])
    (root / "bee" / "not_an_image.png").write_bytes(b"hello")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "recs"
    said = []
    info = records.prepare(str(images), str(out), shard_size=50, workers=1, say=said.append)
    return out, info, said


def test_prepare_round_trips_labels_names_and_bytes(images, prepared):
    out, info, said = prepared
    src = sources.load_records(out)
    with pytest.warns(UserWarning, match="skipped 2"):
        ref = sources.load_folder(images)
    assert src.num_examples == ref.num_examples == 180 == info["count"]
    assert src.class_names == ref.class_names == CLASSES
    np.testing.assert_array_equal(src.labels, ref.labels)
    assert sorted(p for p, _ in info["skipped"]) == ["ant/truncated.jpg", "bee/not_an_image.png"]
    assert any("skipped 2 of 182" in s for s in said)
    # Pixels: every record decodes to what load_folder's decoder gives for its file.
    for a, b in zip(src.read(range(180)), ref.read(range(180))):
        np.testing.assert_array_equal(a, b)
    # Bytes: RGB and grayscale JPEGs and plain PNGs are stored as they were, byte for byte;
    # CMYK, EXIF-rotated and RGBA images as PNGs of decode_rgb's pixels.
    stored = src.reader.read_bytes(range(180))
    same = [s == open(p, "rb").read() for s, p in zip(stored, ref.paths)]
    kinds = [int(os.path.basename(p)[:3]) % 9 for p in ref.paths]
    assert all(same[i] for i, k in enumerate(kinds) if k in (0, 2, 5, 6, 7, 8))
    assert not any(same[i] for i, k in enumerate(kinds) if k in (1, 3, 4))
    assert info["converted_to_png"] == sum(k in (1, 3, 4) for k in kinds)
    # Shards: 50 input files each (one bad file skipped in shards 1 and 2), sizes and hashes
    # in the index.
    assert len(info["shards"]) == 4 and [s["count"] for s in info["shards"]] == [50, 49, 49, 32]
    for s in info["shards"]:
        data = (out / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not (out / "parts").exists()
    # mean/std from a sample: near the folder's (another sample of the same images).
    np.testing.assert_allclose(src.mean, ref.mean, atol=0.03)
    np.testing.assert_allclose(src.std, ref.std, atol=0.03)


def test_encoded_views_equal_views_of_the_decoded_image(prepared):
    """The fused decode-and-crop path gives exactly the views of the fully decoded image."""
    from jaxssl.data import augment_tf
    from jaxssl.data.tf_import import tf

    T = tf()
    r = records.Records(prepared[0])
    recipe = recipes.get_recipe("simclr")
    for i in range(0, 180, 7):
        data = r.read_bytes([i])[0]
        image = r.read([i])[0]
        assert tuple(augment_tf.image_shape(T.constant(data)).numpy()) == image.shape[:2]
        for mode in ("split", "host"):
            seed = T.constant([3, i], T.int64)
            want = augment_tf.two_views(image, seed, recipe, 24, mode, (0.5,) * 3, (0.25,) * 3)
            got = augment_tf.two_views_encoded(T.constant(data), seed, recipe, 24, mode,
                                               (0.5,) * 3, (0.25,) * 3)
            for a, b in zip(want, got):
                np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{i} {mode}")
        # Any window of a JPEG decodes to the same pixels as the whole image, edges included.
        h, w = image.shape[:2]
        for box in ((0, 0, h, w), (1, 3, h // 2, w // 2), (h // 3, w // 4, h - h // 3, 5)):
            got = augment_tf.decode_window(T.constant(data), box[:2], box[2:]).numpy()
            np.testing.assert_array_equal(got, image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]])


def test_the_pipeline_from_records_equals_the_pipeline_from_the_folder(images, prepared):
    with pytest.warns(UserWarning):
        ref = sources.load_folder(images)
    src = sources.load_records(prepared[0])
    # The same images, labels and statistics: only where the pixels come from differs.
    src = sources.Source(name=src.name, num_examples=src.num_examples, labels=src.labels,
                         class_names=src.class_names, mean=ref.mean, std=ref.std,
                         reader=src.reader)
    kw = dict(global_batch=16, seed=5, mode="split", recipe=recipes.get_recipe("simclr"),
              out_size=24, start_step=9, num_steps=3, process_count=2, prefetch=0)
    for p in (0, 1):
        got = list(pipeline.make_pipeline(src, process_index=p, **kw))
        want = list(pipeline.make_pipeline(ref, process_index=p, **kw))
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a["views"][0], b["views"][0])
            np.testing.assert_array_equal(a["views"][1], b["views"][1])
            np.testing.assert_array_equal(a["labels"], b["labels"])


def test_each_process_reads_only_its_own_rows(prepared, monkeypatch):
    src = sources.load_records(prepared[0])
    asked = []
    real = src.reader.read_bytes
    monkeypatch.setattr(src.reader, "read_bytes", lambda idx: asked.extend(idx) or real(idx))
    plan = pipeline.BatchPlan(180, 16, 5, process_index=1, process_count=2)
    list(pipeline.make_pipeline(src, global_batch=16, seed=5, mode="device", image_size=20,
                                start_step=2, num_steps=2, process_index=1, process_count=2,
                                prefetch=0))
    assert asked == list(plan.indices(2)) + list(plan.indices(3))


def test_device_mode_from_records_decodes_to_a_fixed_size(prepared):
    src = sources.load_records(prepared[0])
    (batch,) = pipeline.make_pipeline(src, global_batch=8, seed=0, mode="device", image_size=20,
                                      num_steps=1, prefetch=0)
    assert batch["images"].shape == (8, 20, 20, 3) and batch["images"].dtype == np.uint8
    with pytest.raises(ValueError, match="image_size"):
        next(pipeline.make_pipeline(src, global_batch=8, seed=0, mode="device", num_steps=1,
                                    prefetch=0))


def test_an_interrupted_prepare_finishes_with_the_same_records(images, prepared, tmp_path):
    out = tmp_path / "recs"
    cmd = [sys.executable, "-m", "jaxssl", "prepare", "--input", str(images), "--output",
           str(out), "--shard_size", "50", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    # Until the first part file is complete (write_bytes renames a hidden temporary into place).
    while not (out / "parts").is_dir() or not [n for n in os.listdir(out / "parts")
                                               if not n.startswith(".")]:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (out / "index.json").exists()
    with pytest.raises(records.RecordsError, match="not finished.*run the same prepare command"):
        records.Records(out)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming: " in done.stdout
    want = json.loads((prepared[0] / "index.json").read_text())
    got = json.loads((out / "index.json").read_text())
    assert got["content_sha256"] == want["content_sha256"]
    assert got["shards"] == want["shards"]
    assert (out / "index.npz").read_bytes() == (prepared[0] / "index.npz").read_bytes()


def _copy(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[0], out)
    return out


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage,match", [
    (lambda d: os.remove(d / "shard-00002-of-00004.rec"),
     "shard shard-00002-of-00004.rec of .* is missing"),
    (lambda d: open(d / "shard-00001-of-00004.rec", "r+b").truncate(1000),
     "shard shard-00001-of-00004.rec of .* is 1,000 bytes, the index says"),
    (lambda d: (d / "index.json").write_text(
        (d / "index.json").read_text().replace('"count": 180', '"count": 181')),
     "index.npz of .* does not match its index.json"),
    (lambda d: (d / "index.npz").write_bytes(b"junk"), "index.npz is damaged"),
    (lambda d: [os.remove(d / n) for n in ("index.json", "prepare.json")],
     "has no index.json: it is not a jaxssl records"),
    (lambda d: (d / "index.json").write_text("{"), "index.json is not valid JSON"),
])
def test_damaged_records_are_one_line_errors(prepared, tmp_path, capsys, damage, match):
    out = _copy(prepared, tmp_path)
    damage(out)
    with pytest.raises(records.RecordsError, match=match):
        records.Records(out)
    # Through the trainer: a one-line error, exit 2, and nothing written.
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "demo", "--workdir", str(workdir),
                     "--config.data.source=records", f"--config.data.path={out}",
                     "--config.data.augment=split"]) == 2
    assert "jaxssl: error: " in _one_line_error(capsys)


def test_reads_keep_a_bounded_number_of_shards_open(prepared, monkeypatch):
    monkeypatch.setattr(records, "OPEN_SHARDS", 2)
    r, ref = records.Records(prepared[0]), records.Records(prepared[0])
    order = np.random.default_rng(1).permutation(180)
    assert r.read_bytes(order) == [ref.read_bytes([i])[0] for i in order]
    assert len(r._open.files) == 2


def test_a_corrupt_shard_is_named_when_read(prepared, tmp_path):
    out = _copy(prepared, tmp_path)
    r = records.Records(out)
    i = int(np.flatnonzero(r.shard == 3)[4])
    with open(out / "shard-00003-of-00004.rec", "r+b") as f:  # same size, other bytes
        f.seek(int(r.offset[i]) + 10)
        f.write(b"\x00\x01\x02")
    r = records.Records(out)
    r.read_bytes([0, 1])  # other records are fine
    with pytest.raises(records.RecordsError,
                       match=f"record {i} in shard shard-00003-of-00004.rec .* fails its checksum"):
        r.read_bytes([0, i])
    os.remove(out / "shard-00002-of-00004.rec")  # gone after the start
    j = int(np.flatnonzero(r.shard == 2)[0])
    with pytest.raises(records.RecordsError, match="cannot read shard shard-00002-of-00004.rec"):
        r.read_bytes([j])


def test_prepare_refuses_bad_outputs_and_strict_stops_at_a_bad_image(images, prepared, tmp_path,
                                                                     capsys):
    def run(*args):
        code = cli.main(["prepare", "--input", str(images), *args])
        return code, _one_line_error(capsys)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run("--output", str(other)) == (2, f"jaxssl: error: output {other} is not empty (it "
                                              f"holds 1 other files); pass an empty or new folder")
    assert (other / "notes.txt").read_text() == "mine" and len(os.listdir(other)) == 1
    code, err = run("--output", str(prepared[0]), "--shard_size", "60")
    assert code == 2 and "prepared with other options (shard_size=50)" in err
    code, err = run("--output", str(tmp_path / "strict"), "--strict", "--workers", "1")
    assert code == 2 and "cannot read image ant/truncated.jpg" in err and "--strict" in err
    # Another input into finished records.
    sub = tmp_path / "sub"
    shutil.copytree(images / "ant", sub / "ant")
    shutil.copytree(images / "cow", sub / "cow")
    code = cli.main(["prepare", "--input", str(sub), "--output", str(prepared[0])])
    assert code == 2 and "holds the records of another input" in _one_line_error(capsys)
    # Finished records with the same command: nothing to do.
    assert cli.main(["prepare", "--input", str(images), "--output", str(prepared[0]),
                     "--shard_size", "50"]) == 0
    assert "complete already" in capsys.readouterr().out


def test_prepare_in_parallel_equals_prepare_in_one_process(images, prepared, tmp_path):
    out = tmp_path / "parallel"
    info = records.prepare(str(images), str(out), shard_size=50, workers=2, say=lambda m: None)
    assert info["content_sha256"] == prepared[1]["content_sha256"]
    assert (out / "index.npz").read_bytes() == (prepared[0] / "index.npz").read_bytes()


def test_records_in_a_bucket(images, prepared, bucket):  # noqa: F811 (the fixture)
    from test_files import stored

    records.prepare(str(images), "gs://b/recs", shard_size=50, workers=1, say=lambda m: None)
    names = {k.split("/", 2)[-1] for k in stored(bucket) if k.startswith("b/recs/")}
    assert {"index.json", "index.npz", "prepare.json"} <= names
    assert not any(n.startswith("parts/") for n in names)
    remote, local = sources.load_records("gs://b/recs"), sources.load_records(prepared[0])
    assert remote.name == "records:gs://b/recs"
    np.testing.assert_array_equal(remote.labels, local.labels)
    idx = [5, 170, 0, 99, 5]
    assert remote.reader.read_bytes(idx) == local.reader.read_bytes(idx)
    fallback = records.Records("gs://b/recs")
    fallback._fs = False  # no fsspec implementation for the protocol: epath opens each object
    assert fallback.read_bytes(idx) == local.reader.read_bytes(idx)
    for key in [k for k in bucket.store if "shard-00001" in k]:
        del bucket.store[key]
    with pytest.raises(records.RecordsError, match="shard-00001-of-00004.rec of gs://b/recs is missing"):
        records.Records("gs://b/recs")
    with pytest.raises(records.RecordsError, match="does not exist"):
        records.Records("gs://b/nothing")


def test_an_unreachable_bucket_is_one_line(monkeypatch, capsys):
    from jaxssl import files

    def refuse(path):
        raise ConnectionError("Failed to connect to storage.googleapis.com port 443")

    monkeypatch.setattr(files, "RETRY_DELAYS", (0.0,))
    monkeypatch.setattr(files, "_remote", refuse)
    with pytest.raises(records.RecordsError, match="cannot read records gs://b/x: ConnectionError"):
        records.Records("gs://b/x")


# ----------------------------------------------------------------------------- training

RECORDS_RUN = [("data.augment", "split"), ("eval.bank_examples", "90"),
               ("eval.query_examples", "90"), ("eval.batch_size", "90"), ("batch_size", "16")]


def _records_config(path, *extra):
    config = configuration.load_config("demo")
    configuration.apply_overrides(config, TINY + RECORDS_RUN + [
        ("data.source", "records"), ("data.path", str(path)), ("data.eval_path", str(path))]
        + list(extra))
    return config


@pytest.fixture(scope="module")
def straight_from_records(prepared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("from_records")
    result = train.train(_records_config(prepared[0]), str(workdir))
    assert result.status == "done" and result.step == 12
    return result, records_without_timing(workdir), workdir


def test_training_from_records_resumes_bitwise_after_kill_9(prepared, straight_from_records,
                                                           tmp_path):
    reference, reference_records, _ = straight_from_records
    assert any("eval/knn_top1" in r for r in reference_records)
    workdir = tmp_path / "killed"
    overrides = [f"--config.{k}={v}" for k, v in TINY + RECORDS_RUN + [
        ("data.source", "records"), ("data.path", prepared[0]), ("data.eval_path", prepared[0])]]
    proc = subprocess.Popen([sys.executable, "-m", "jaxssl", "train", "--config", "demo",
                             "--workdir", str(workdir), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    ckpt = workdir / "checkpoints"
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = train.train(_records_config(prepared[0]), str(workdir))
    assert result.step == 12
    assert_same_state(reference.state, result.state)
    assert records_without_timing(workdir) == reference_records


def test_evaluations_read_records_in_batches(prepared, straight_from_records, tmp_path,
                                             monkeypatch):
    """kNN, the linear probe and fine-tuning from records: images are read a batch at a time
    (never the whole split), and kNN equals the trainer's monitor at the same step."""
    from jaxssl import evaluation

    workdir = tmp_path / "eval"
    shutil.copytree(straight_from_records[2], workdir)
    biggest = []
    real = records.Records.read_bytes
    monkeypatch.setattr(records.Records, "read_bytes",
                        lambda self, idx: biggest.append(len(idx)) or real(self, idx))
    config = _records_config(prepared[0], ("eval.linear_epochs", "2"),
                             ("eval.finetune_epochs", "1"), ("eval.finetune_fraction", "0.5"))
    knn = evaluation.evaluate("knn", config, str(workdir))
    monitor = [r for r in straight_from_records[1] if "eval/knn_top1" in r][-1]
    assert knn["step"] == monitor["step"] == 12
    assert knn["top1"] == pytest.approx(monitor["eval/knn_top1"], abs=1e-6)
    for kind in ("linear", "finetune"):
        result = evaluation.evaluate(kind, config, str(workdir))
        assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert max(biggest) <= 96  # eval.batch_size, 90, rounded up to the 8 devices


@pytest.mark.parametrize("name", ["simclr_imagenet", "mocov2_imagenet"])
def test_the_imagenet_configs_read_records(prepared, name):
    from jaxssl import experiment, parallel

    config = configuration.load_config(name)
    assert (config.data.source, config.data.augment, config.data.out_size) == ("records", "split", 224)
    with pytest.raises(configuration.ConfigError, match="needs data.path"):
        configuration.validate(config)
    configuration.apply_overrides(config, [("data.path", str(prepared[0])),
                                           ("data.eval_path", str(prepared[0])),
                                           ("batch_size", "64")])
    configuration.validate(config)
    exp = experiment.build(config, parallel.make_mesh(), with_eval=True)
    assert exp.train_source.reader is not None and exp.eval_source.num_examples == 180
    assert exp.plan.steps_per_epoch == 180 // 64


def test_a_shard_damaged_during_a_run_ends_it_with_one_line_and_loses_nothing(
        prepared, straight_from_records, tmp_path, capsys):
    reference, reference_records, _ = straight_from_records
    out = _copy(prepared, tmp_path)
    good = (out / "shard-00001-of-00004.rec").read_bytes()
    r = records.Records(out)
    with open(out / "shard-00001-of-00004.rec", "r+b") as f:  # every record of the shard
        for offset in r.offset[r.shard == 1]:
            f.seek(int(offset) + 20)
            f.write(b"xyz")
    workdir = tmp_path / "run"
    args = ["train", "--config", "demo", "--workdir", str(workdir)] + [
        f"--config.{k}={v}" for k, v in TINY + RECORDS_RUN + [
            ("data.source", "records"), ("data.path", out), ("data.eval_path", out)]]
    assert cli.main(args) == 1
    err = _one_line_error(capsys)
    assert err.startswith("jaxssl: record ") and "in shard shard-00001-of-00004.rec of" in err
    assert "fails its checksum" in err
    # The shard restored, the same command completes the run as if nothing had happened.
    (out / "shard-00001-of-00004.rec").write_bytes(good)
    assert cli.main(args) == 0
    result = train.train(_records_config(out), str(workdir))  # already done: restores
    assert result.step == 12
    assert_same_state(reference.state, result.state)
