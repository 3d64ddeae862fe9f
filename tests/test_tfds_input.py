"""TFDS splits read by index (array_record, `data/tfds_input.py`) or streamed (TFRecord,
`data/tfds_stream.py`), and `sources.load_tfds`'s choice between them and memory.

One tiny dataset (JPEGs of varied sizes, a grayscale JPEG and a PNG among them, a ClassLabel;
an "odd" split holding a BMP) is built once in both file formats, three shards per split.
"""

import io
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxssl.data import pipeline, recipes, records, sources, tfds_input, tfds_stream

NAME = "jaxssl_tfds_input_tiny"
N_TRAIN = 48
CLASSES = ["a", "b", "c"]


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _encode(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _examples(split: str):
    """(key, image bytes, label) of a split; images of 17-60 px sides."""
    rng = np.random.default_rng({"train": 0, "test": 1, "odd": 2}[split])
    n = {"train": N_TRAIN, "test": 16, "odd": 4}[split]
    for i in range(n):
        h, w = (int(x) for x in rng.integers(17, 61, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fmt = "JPEG"
        if i == 5:
            image = image[..., 0]  # a grayscale JPEG
        elif i == 7:
            fmt = "PNG"
        elif split == "odd" and i == 2:
            fmt = "BMP"
        yield i, _encode(image, fmt), i % 3


@pytest.fixture(scope="module")
def tfds():
    from jaxssl.data.tf_import import tf

    tf()
    return pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def built(tfds, tmp_path_factory):
    """{"tfrecord": data_dir, "array_record": data_dir, "examples": {split: [(bytes, label)]
    in TFDS's order}} of one dataset prepared in both formats."""

    class JaxsslTfdsInputTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=CLASSES)}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "test", "odd")}

        def _generate_examples(self, split):
            for key, data, label in _examples(split):
                yield key, {"image": data, "label": label}

    out = {}
    for fmt in ("tfrecord", "array_record"):
        data_dir = tmp_path_factory.mktemp(fmt)
        JaxsslTfdsInputTiny(data_dir=data_dir, file_format=fmt).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=3))
        out[fmt] = data_dir
    builder = tfds.builder(NAME, data_dir=out["tfrecord"])
    out["examples"] = {}
    for split in ("train", "test"):
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        out["examples"][split] = [(bytes(x["image"]), int(x["label"])) for x in tfds.as_numpy(ds)]
    return out


def _copy(built, fmt, tmp_path, keep_cache=False):
    """A copy of the prepared dataset (without the jaxssl index cache unless keep_cache)."""
    src = os.path.join(built[fmt], NAME)
    dst = tmp_path / fmt
    shutil.copytree(src, dst / NAME, ignore=None if keep_cache else
                    shutil.ignore_patterns("jaxssl-index-*"))
    return dst, dst / NAME / "1.0.0"


# ---------------------------------------------------------------------------------------------
# array_record: read by index


def test_index_reads_the_builders_examples_and_caches_its_index(built, capsys):
    src = sources.load_tfds(NAME, "train", data_dir=built["array_record"])
    examples = built["examples"]["train"]
    assert isinstance(src.reader, tfds_input.TfdsIndex) and src.images is None
    assert src.num_examples == N_TRAIN and src.class_names == tuple(CLASSES)
    assert src.labels.dtype == np.int32
    np.testing.assert_array_equal(src.labels, [label for _, label in examples])
    order = np.random.default_rng(0).permutation(N_TRAIN)
    assert src.reader.read_bytes(order) == [examples[i][0] for i in order]
    generated = sorted(data for _, data, _ in _examples("train"))
    assert sorted(src.reader.read_bytes(range(N_TRAIN))) == generated
    for i, image in zip([5, 7, 11], src.read([5, 7, 11])):
        np.testing.assert_array_equal(image, records.decode_record(examples[i][0]))
    assert all(0.3 < m < 0.7 for m in src.mean) and all(0.15 < s < 0.35 for s in src.std)
    note = capsys.readouterr().out
    assert "one-off cost" in note and "cached in" in note and str(built["array_record"]) in note
    again = sources.load_tfds(NAME, "train", data_dir=built["array_record"])
    assert capsys.readouterr().out == ""  # from the cache: no pass
    np.testing.assert_array_equal(again.labels, src.labels)
    assert (again.mean, again.std) == (src.mean, src.std)
    clone = pickle.loads(pickle.dumps(src.reader))
    assert clone.read_bytes([3, 1]) == [examples[3][0], examples[1][0]]


def test_index_pipeline_equals_the_records_pipeline(built, tmp_path_factory):
    """The same images through jaxssl's records give bitwise the same batches."""
    out = tmp_path_factory.mktemp("records") / "train"
    info = records.prepare(f"tfds:{NAME}/train", str(out), data_dir=str(built["tfrecord"]),
                           shard_size=20, workers=1, say=lambda m: None)
    assert info["converted_to_png"] == 0  # the records hold TFDS's bytes unchanged
    # From the array_record copy (which as_dataset cannot read): the same records.
    other = records.prepare(f"tfds:{NAME}/train", str(out.parent / "from_array_record"),
                            data_dir=str(built["array_record"]), shard_size=20, workers=1,
                            say=lambda m: None)
    assert other["content_sha256"] == info["content_sha256"]
    index = sources.load_tfds(NAME, "train", data_dir=built["array_record"])
    rec = sources.load_records(out)
    assert rec.reader.read_bytes(range(N_TRAIN)) == index.reader.read_bytes(range(N_TRAIN))
    rec = sources.Source(name=rec.name, num_examples=rec.num_examples, labels=rec.labels,
                         class_names=rec.class_names, mean=index.mean, std=index.std,
                         reader=rec.reader)
    recipe = recipes.get_recipe("simclr")
    for mode in ("host", "split"):
        kw = dict(global_batch=8, seed=3, mode=mode, recipe=recipe, out_size=16, start_step=4,
                  num_steps=3, process_index=1, process_count=2, prefetch=0)
        for a, b in zip(pipeline.make_pipeline(index, **kw), pipeline.make_pipeline(rec, **kw),
                        strict=True):
            np.testing.assert_array_equal(a["labels"], b["labels"])
            for va, vb in zip(a["views"], b["views"], strict=True):
                assert va.dtype == vb.dtype and va.shape == (4, 16, 16, 3)
                np.testing.assert_array_equal(va, vb)


def test_small_splits_stay_in_memory_in_either_format(built):
    tfr = sources.load_tfds(NAME, "test", data_dir=built["tfrecord"], image_size=16)
    arr = sources.load_tfds(NAME, "test", data_dir=built["array_record"], image_size=16)
    assert tfr.images.shape == (16, 16, 16, 3) and tfr.reader is None and arr.reader is None
    np.testing.assert_array_equal(tfr.images, arr.images)
    np.testing.assert_array_equal(tfr.labels, arr.labels)
    # Images of varying sizes without image_size: in memory they cannot be; by index they can.
    assert isinstance(sources.load_tfds(NAME, "test", data_dir=built["array_record"]).reader,
                      tfds_input.TfdsIndex)


# ---------------------------------------------------------------------------------------------
# TFRecord: streamed


@pytest.fixture(scope="module")
def stream(built):
    src = sources.load_tfds(NAME, "train", data_dir=built["tfrecord"], max_gib=1e-9)
    assert isinstance(src.reader, tfds_stream.TfdsStream)  # TFRecord over max_gib: streamed
    return src


def _rows(src, plan, start_step, num_steps):
    """(image bytes, label, seed) of this process's rows of steps [start, start + num)."""
    import tensorflow as tf

    out = []
    for _, _, _, ds in src.reader.rows(plan, start_step, num_steps):
        ds = ds.map(lambda record, seed: (*src.reader._parse(record), seed))
        out += [(bytes(d), int(label), tuple(seed)) for d, label, seed in ds.as_numpy_iterator()]
    assert tf.executing_eagerly()
    return out


def test_stream_labels_and_stats_equal_the_index_ones(stream, built):
    index = sources.load_tfds(NAME, "train", data_dir=built["array_record"])
    np.testing.assert_array_equal(stream.labels, index.labels)
    assert (stream.mean, stream.std) == (index.mean, index.std)
    assert stream.reader.read_bytes([2, 0]) == [built["examples"]["train"][i][0] for i in (2, 0)]
    clone = pickle.loads(pickle.dumps(stream.reader))
    assert clone.read_bytes([1]) == stream.reader.read_bytes([1])


def test_stream_processes_read_tfds_split_for_jax_process(stream, built, tfds):
    builder = tfds.builder(NAME, data_dir=built["tfrecord"])
    for count in (2, 5):  # 48 = 2 x 24 = 5 x 9 + 3 (dropped)
        for index in range(count):
            split = tfds.split_for_jax_process("train", process_index=index, process_count=count,
                                               drop_remainder=True)
            theirs = [(os.fspath(f.filename), f.skip, f.take)
                      for f in builder.info.splits[split].file_instructions if f.take]
            assert stream.reader.process_instructions(index, count) == theirs


def test_stream_sees_each_example_once_per_epoch_in_an_order_of_seed_and_epoch(stream, built):
    examples = built["examples"]["train"]
    label_of = dict(examples)
    spe = N_TRAIN // 8
    epochs = {}
    for seed in (0, 1):
        per_process = [_rows(stream, pipeline.BatchPlan(N_TRAIN, 8, seed, p, 2), 0, 2 * spe)
                       for p in (0, 1)]
        for p, rows in enumerate(per_process):
            plan = pipeline.BatchPlan(N_TRAIN, 8, seed, p, 2)
            assert [r[2] for r in rows] == [tuple(s) for step in range(2 * spe)
                                            for s in plan.example_seeds(step)]
            assert all(label == label_of[d] for d, label, _ in rows)
        for epoch in (0, 1):
            part = [[r[0] for r in rows[epoch * 24:(epoch + 1) * 24]] for rows in per_process]
            assert sorted(part[0] + part[1]) == sorted(d for d, _ in examples)  # each once
            # Each process reads its own half of the split: the first or the last 24 examples.
            for p in (0, 1):
                assert set(part[p]) == {d for d, _ in examples[24 * p:24 * (p + 1)]}
            epochs[seed, epoch] = part
    assert len({tuple(map(tuple, part)) for part in epochs.values()}) == 4  # all orders differ
    # The order is a function of (seed, epoch): a stream started anywhere, or with another
    # batch size, reads the same order from there.
    resumed = _rows(stream, pipeline.BatchPlan(N_TRAIN, 8, 1, 1, 2), spe + 2, 3)
    assert [r[0] for r in resumed] == epochs[1, 1][1][8:20]
    other = _rows(stream, pipeline.BatchPlan(N_TRAIN, 4, 1, 1, 2), 0, 1)
    assert [r[0] for r in other] == epochs[1, 0][1][:2]


def test_stream_batches_are_make_pipelines_and_resume_exactly(stream):
    from jaxssl.data import augment_tf

    recipe = recipes.get_recipe("simclr")
    kw = dict(global_batch=8, seed=5, recipe=recipe, out_size=16, process_index=1,
              process_count=2, prefetch=0)
    full = list(pipeline.make_pipeline(stream, mode="split", num_steps=9, **kw))
    resumed = list(pipeline.make_pipeline(stream, mode="split", start_step=4, num_steps=5, **kw))
    assert len(full) == 9 and len(resumed) == 5
    for a, b in zip(full[4:], resumed, strict=True):  # across the end of epoch 0 (6 steps)
        np.testing.assert_array_equal(a["labels"], b["labels"])
        for va, vb in zip(a["views"], b["views"], strict=True):
            assert va.dtype == np.uint8 and va.shape == (4, 16, 16, 3)
            np.testing.assert_array_equal(va, vb)
    # A batch's views are two_views_encoded of its rows' bytes with the plan's seeds.
    plan = pipeline.BatchPlan(N_TRAIN, 8, 5, 1, 2)
    rows = _rows(stream, plan, 7, 1)
    np.testing.assert_array_equal(full[7]["labels"], [label for _, label, _ in rows])
    for i, (data, _, seed) in enumerate(rows):
        v1, v2 = augment_tf.two_views_encoded(data, np.array(seed), recipe, 16, "split",
                                              stream.mean, stream.std)
        np.testing.assert_array_equal(full[7]["views"][0][i], v1)
        np.testing.assert_array_equal(full[7]["views"][1][i], v2)
    host = next(pipeline.make_pipeline(stream, mode="host", num_steps=1, **kw))
    assert host["views"][0].dtype == np.float32 and host["labels"].shape == (4,)
    device = next(pipeline.make_pipeline(stream, mode="device", num_steps=1, image_size=12, **kw))
    assert device["images"].shape == (4, 12, 12, 3) and device["images"].dtype == np.uint8
    with pytest.raises(ValueError) as excinfo:
        next(pipeline.make_pipeline(stream, mode="device", num_steps=1, **kw))
    assert_one_line(excinfo, "image_size")


def test_stream_has_no_random_access(stream, monkeypatch):
    monkeypatch.setattr(tfds_stream, "SCAN_LIMIT", 8)
    assert len(stream.read([7])) == 1  # the first examples: the augmentation preview
    with pytest.raises(ValueError) as excinfo:
        stream.read([3, 9])
    assert_one_line(excinfo, "no random access", "kNN", "array_record", "jaxssl prepare",
                    "eval.knn=False")


# ---------------------------------------------------------------------------------------------
# Choices and bad inputs


def test_read_modes_refuse_what_the_format_cannot_do(built):
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "test", data_dir=built["tfrecord"], image_size=16, max_gib=1e-9,
                          read="memory")
    assert_one_line(excinfo, "GiB in memory")
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "test", data_dir=built["tfrecord"], read="index")
    assert_one_line(excinfo, "TFRecord", "--file_format=array_record",
                    f"jaxssl prepare --input tfds:{NAME}/test")
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "test", data_dir=built["array_record"], read="stream")
    assert_one_line(excinfo, "array_record", "read='index'")
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "test", data_dir=built["tfrecord"], read="fast")
    assert_one_line(excinfo, "'auto', 'memory', 'index' or 'stream'")


@pytest.mark.parametrize("fmt,read", [("tfrecord", "stream"), ("array_record", "auto")])
def test_unknown_split_and_not_prepared(built, tmp_path, fmt, read):
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "validation", data_dir=built[fmt], read=read)
    assert_one_line(excinfo, "no split 'validation'", "train, test, odd")
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "train", data_dir=tmp_path, read=read)
    assert_one_line(excinfo, "is not prepared in", "tfds build")


@pytest.mark.parametrize("fmt,read", [("tfrecord", "stream"), ("array_record", "index")])
def test_a_missing_or_damaged_file_is_one_line(built, tmp_path, fmt, read):
    data_dir, version = _copy(built, fmt, tmp_path / "missing")
    shard = sorted(p for p in os.listdir(version) if "-train." in p)[1]
    os.remove(version / shard)
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "train", data_dir=data_dir, read=read)
    assert_one_line(excinfo, f"file {shard}", "is missing", "prepare the dataset again")

    data_dir, version = _copy(built, fmt, tmp_path / "damaged")
    sources.load_tfds(NAME, "train", data_dir=data_dir, read=read)  # its index is cached
    path = version / shard
    data = bytearray(path.read_bytes())
    data[100:164] = bytes(64)  # in the first record; the same size: only reading can tell
    path.write_bytes(bytes(data))
    src = sources.load_tfds(NAME, "train", data_dir=data_dir, read=read)  # the cached index
    with pytest.raises(ValueError) as excinfo:
        if fmt == "tfrecord":
            list(pipeline.make_pipeline(src, global_batch=8, seed=0, mode="split", out_size=8,
                                        recipe=recipes.get_recipe("simclr"), num_steps=6))
        else:
            src.reader.read_bytes(range(N_TRAIN))
    assert_one_line(excinfo, f"tfds:{NAME}/train", "damaged", "prepare the dataset again")
    assert "function_node" not in str(excinfo.value)
    for name in os.listdir(version):
        if name.startswith("jaxssl-index-"):
            os.remove(version / name)
    with pytest.raises(ValueError) as excinfo:  # the index pass meets the damage
        sources.load_tfds(NAME, "train", data_dir=data_dir, read=read)
    assert_one_line(excinfo, f"tfds:{NAME}/train", "damaged", "prepare the dataset again")


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_an_image_that_is_not_jpeg_or_png_is_one_line(built, fmt):
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(NAME, "odd", data_dir=built[fmt],
                          read="stream" if fmt == "tfrecord" else "index")
    assert_one_line(excinfo, "is stored as BMP", f"jaxssl prepare --input tfds:{NAME}/odd")


def test_the_index_is_cached_at_home_when_the_dataset_folder_is_read_only(built, tmp_path,
                                                                          monkeypatch, capsys):
    data_dir, version = _copy(built, "array_record", tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    writable = tfds_input._writable
    monkeypatch.setattr(tfds_input, "_writable",
                        lambda folder: folder != str(version) and writable(folder))
    src = sources.load_tfds(NAME, "train", data_dir=data_dir)
    home = tmp_path / "cache" / "jaxssl" / "tfds" / f"{NAME}-1.0.0"
    names = [p.name for p in home.iterdir()]
    assert len(names) == 1 and names[0].startswith("jaxssl-index-train-"), names
    assert not any(n.startswith("jaxssl-") for n in os.listdir(version))
    capsys.readouterr()
    again = sources.load_tfds(NAME, "train", data_dir=data_dir)
    assert capsys.readouterr().out == ""
    np.testing.assert_array_equal(again.labels, src.labels)
