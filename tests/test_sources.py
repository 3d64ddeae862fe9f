"""Data sources: image folders (bad files, odd modes), arrays, the CIFAR-10 npz, TFDS, built-in."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxssl.data import builtin, sources

CIFAR_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------
# Image folders


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """cat/ and dog/ with every decoding case, two bad files, and files that are not images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    expected = {}  # relative path -> expected uint8 [H, W, 3] (None: only check shape and dtype)

    _save(root / "cat" / "a_photo.jpg", Image.fromarray(rng.integers(0, 256, (20, 16, 3), np.uint8)))
    expected["cat/a_photo.jpg"] = None
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: alpha is dropped, not composited
    _save(root / "cat" / "b_rgba.png", Image.fromarray(rgba, "RGBA"))
    expected["cat/b_rgba.png"] = np.broadcast_to(np.uint8([10, 20, 30]), (10, 12, 3))
    palette = Image.new("P", (3, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    _save(root / "cat" / "c_palette.png", palette)
    want = np.zeros((2, 3, 3), np.uint8)
    want[...] = (255, 0, 0)
    want[0, 1] = (0, 0, 255)
    expected["cat/c_palette.png"] = want
    _save(root / "cat" / "d_gray.png", Image.fromarray(np.full((5, 7), 77, np.uint8), "L"))
    expected["cat/d_gray.png"] = np.full((5, 7, 3), 77, np.uint8)
    _save(root / "cat" / "e_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    expected["cat/e_cmyk.jpg"] = np.broadcast_to(np.uint8([255, 0, 0]), (8, 8, 3))  # red
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    (root / "cat" / "f_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    _save(root / "dog" / "a_photo.JPEG", Image.fromarray(rng.integers(0, 256, (9, 30, 3), np.uint8)))
    expected["dog/a_photo.JPEG"] = None
    sixteen = np.array([[0, 255, 256, 4096, 32768, 65535]], np.uint16)
    _save(root / "dog" / "b_16bit.png", Image.fromarray(sixteen))  # mode I;16
    expected["dog/b_16bit.png"] = np.repeat((sixteen >> 8).astype(np.uint8)[..., None], 3, axis=2)
    _save(root / "dog" / "c_la.png", Image.new("LA", (4, 3), (100, 50)))
    expected["dog/c_la.png"] = np.full((3, 4, 3), 100, np.uint8)
    _save(root / "dog" / "d_gray.jpg", Image.fromarray(np.full((6, 6), 200, np.uint8), "L"))
    expected["dog/d_gray.jpg"] = None
    _save(root / "dog" / "e.bmp", Image.fromarray(np.full((4, 4, 3), 9, np.uint8)))
    expected["dog/e.bmp"] = np.full((4, 4, 3), 9, np.uint8)
    _save(root / "dog" / "f.webp", Image.fromarray(np.full((4, 4, 3), 128, np.uint8)), lossless=True)
    expected["dog/f.webp"] = np.full((4, 4, 3), 128, np.uint8)
    (root / "dog" / "g_not_an_image.png").write_text("this is text, not a PNG\n")

    (root / "dog" / "notes.txt").write_text("ignored: not an image extension\n")
    (root / "dog" / ".hidden.jpg").write_text("ignored: hidden\n")
    return root, expected


def test_folder_loads_good_images_and_skips_bad_ones(image_tree):
    root, expected = image_tree
    with pytest.warns(UserWarning, match="skipped 2 of 13 image files") as record:
        source = sources.load_folder(root)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert source.num_examples == len(expected) == 11
    assert source.images is None and len(source.paths) == 11
    assert source.class_names == ("cat", "dog")
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in source.paths]
    assert rel == sorted(expected)
    np.testing.assert_array_equal(source.labels, [0 if r.startswith("cat/") else 1 for r in rel])
    assert source.labels.dtype == np.int32
    assert sorted(os.path.basename(p) for p, _ in source.skipped) == ["f_truncated.jpg",
                                                                      "g_not_an_image.png"]
    assert all(reason and "\n" not in reason for _, reason in source.skipped)

    images = source.read(range(source.num_examples))
    for name, image in zip(rel, images):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        want = expected[name]
        if name.endswith("cmyk.jpg"):  # JPEG is lossy; the colour must still be red
            np.testing.assert_allclose(image.astype(int), want.astype(int), atol=8, err_msg=name)
        elif want is not None:
            np.testing.assert_array_equal(image, want, err_msg=name)
    assert images[rel.index("cat/a_photo.jpg")].shape == (20, 16, 3)
    assert images[rel.index("dog/d_gray.jpg")].shape == (6, 6, 3)
    assert all(0 < m < 1 for m in source.mean) and all(0 < s < 0.5 for s in source.std)
    np.testing.assert_array_equal(source.read([3])[0], images[3])


def test_folder_strict_raises_naming_the_first_bad_file(image_tree):
    root, _ = image_tree
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(root, strict=True)
    assert_one_line(excinfo, "f_truncated.jpg", "strict=False")


def test_folder_labelling_modes(tmp_path, image_tree):
    root, _ = image_tree
    with pytest.warns(UserWarning):
        assert sources.load_folder(root, labelled=False).labels is None
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"{i}.png", Image.new("RGB", (4, 4), (i, i, i)))
    _save(flat / "sub" / "x.png", Image.new("RGB", (4, 4)))
    source = sources.load_folder(flat)  # "auto": a loose image means unlabelled
    assert source.labels is None and source.class_names is None and source.num_examples == 4
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(flat, labelled=True)
    assert_one_line(excinfo, "0.png", "labelled=False")
    assert sources.load_folder(flat / "..", labelled="auto").labels is None  # one subfolder only
    assert sources.load_folder(flat / "sub", labelled=False).num_examples == 1


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(empty)
    assert_one_line(excinfo, "is empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(tmp_path / "texts")
    assert_one_line(excinfo, "none ending in", ".png")
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.load_folder(tmp_path / "missing")
    assert_one_line(excinfo, "does not exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(tmp_path / "bad")
    assert_one_line(excinfo, "none of the 1 image files")
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(tmp_path / "bad", labelled="yes")
    assert_one_line(excinfo, "labelled must be")


# ---------------------------------------------------------------------------------------------
# In-memory arrays


def test_from_arrays_conversions_and_stats():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 5, 4, 3), np.uint8)
    source = sources.from_arrays(rgb, [0, 1, 2, 0, 1, 2], class_names=["a", "b", "c"])
    assert source.images is rgb and source.labels.dtype == np.int32
    pixels = rgb.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(source.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(source.std, pixels.std(0), rtol=1e-12)
    np.testing.assert_array_equal(source.read([4, 0])[0], rgb[4])

    gray = rgb[..., 0]
    for images in (gray, gray[..., None]):
        out = sources.from_arrays(images).images
        assert out.shape == (6, 5, 4, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))
    floats = rng.random((2, 3, 3, 3))
    np.testing.assert_array_equal(sources.from_arrays(floats).images, np.round(floats * 255))
    ints = rgb.astype(np.int64)
    np.testing.assert_array_equal(sources.from_arrays(ints).images, rgb)


@pytest.mark.parametrize("images, labels, kwargs, fragment", [
    (np.zeros((2, 4, 4, 4), np.uint8), None, {}, "got shape"),
    (np.zeros((2, 3, 8, 8), np.uint8), None, {}, "channels-first"),
    (np.full((2, 4, 4, 3), 2.0), None, {}, "divide 0-255"),
    (np.full((2, 4, 4, 3), np.nan), None, {}, "[0, 1]"),
    (np.full((2, 4, 4, 3), 300, np.int32), None, {}, "0-255"),
    (np.zeros((2, 4, 4, 3), bool), None, {}, "uint8"),
    (np.zeros((0, 4, 4, 3), np.uint8), None, {}, "at least one"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, 1, 2], {}, "one per image"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0.0, 1.0], {}, "integers"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, -1], {}, "labels=None"),
    (np.zeros((2, 4, 4, 3), np.uint8), [0, 3], {"class_names": ["a", "b"]}, "has no name"),
    (np.zeros((2, 4, 4, 3), np.uint8), None, {"class_names": ["a"]}, "without labels"),
])
def test_from_arrays_errors(images, labels, kwargs, fragment):
    with pytest.raises(ValueError) as excinfo:
        sources.from_arrays(images, labels, **kwargs)
    assert_one_line(excinfo, fragment)


def test_source_checks_its_fields():
    with pytest.raises(ValueError, match="exactly one of"):
        sources.Source("x", 1, None, None, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="int32"):
        sources.Source("x", 1, np.zeros(1, np.int64), None, (0, 0, 0), (1, 1, 1),
                       images=np.zeros((1, 2, 2, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 JPEG npz


def test_cifar10_npz_test_split():
    if not CIFAR_NPZ.exists():
        pytest.skip(f"CIFAR-10 npz not found at {CIFAR_NPZ} (see ../shared/data/cifar10/README.md)")
    source = sources.load_cifar10_npz(CIFAR_NPZ, split="test")
    assert source.images.shape == (10000, 32, 32, 3) and source.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(source.labels), np.full(10, 1000))
    assert source.class_names[:3] == ("airplane", "automobile", "bird")
    with np.load(CIFAR_NPZ) as data:  # an independent decode of the first and last images
        blob, offsets = data["test_jpeg"], data["test_offsets"]
    for i in (0, 1, 9999):
        want = np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        np.testing.assert_array_equal(source.images[i], want)
    assert 0.4 < source.mean[0] < 0.6 and 0.2 < source.std[0] < 0.3


def test_cifar10_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        sources.load_cifar10_npz(tmp_path / "nope.npz")
    assert_one_line(excinfo, "nope.npz", "README.md")
    with pytest.raises(ValueError) as excinfo:
        sources.load_cifar10_npz(tmp_path / "nope.npz", split="val")
    assert_one_line(excinfo, "'train' or 'test'")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError) as excinfo:
        sources.load_cifar10_npz(tmp_path / "other.npz", split="test")
    assert_one_line(excinfo, "test_jpeg", "README.md")


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets


@pytest.fixture(scope="module")
def tfds():
    from jaxssl.data.tf_import import tf

    tf()
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_mocked(tfds):
    with tfds.testing.mock_data(num_examples=12):
        source = sources.load_tfds("cifar10", "train")
        assert source.images.shape == (12, 32, 32, 3) and source.images.dtype == np.uint8
        assert source.labels.dtype == np.int32 and source.labels.max() < 10
        assert len(source.class_names) == 10
        gray = sources.load_tfds("mnist", "test")  # [28, 28, 1] -> RGB
        assert gray.images.shape == (12, 28, 28, 3)
        np.testing.assert_array_equal(gray.images[..., 0], gray.images[..., 2])
        varying = sources.load_tfds("imagenette", "train", image_size=16)
        assert varying.images.shape == (12, 16, 16, 3)
        with pytest.raises(ValueError) as excinfo:
            sources.load_tfds("imagenette", "train")
        assert_one_line(excinfo, "varying sizes", "image_size=")


@pytest.fixture(scope="module")
def tiny_tfds(tfds, tmp_path_factory):
    """A real (not mocked) prepared TFDS dataset: 6x5 grayscale images, a labelled split and an
    all -1 "unlabelled" one, written to a temporary data_dir without any download."""

    class JaxsslTinyGray(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 5, 1)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9, False),
                    "unlabelled": self._generate_examples(4, True)}

        def _generate_examples(self, n, unlabelled):
            for i in range(n):
                yield i, {"image": np.full((6, 5, 1), 20 * i, np.uint8),
                          "label": -1 if unlabelled else i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    JaxsslTinyGray(data_dir=data_dir).download_and_prepare()
    return "jaxssl_tiny_gray", data_dir


def test_tfds_prepared(tiny_tfds):
    name, data_dir = tiny_tfds
    source = sources.load_tfds(name, "train", data_dir=data_dir)
    assert source.images.shape == (9, 6, 5, 3) and source.class_names == ("a", "b", "c")
    index = source.images[:, 0, 0, 0] // 20  # the image of example i is filled with 20 * i
    np.testing.assert_array_equal(source.labels, index % 3)
    assert sorted(index) == list(range(9))
    assert sources.load_tfds(name, "unlabelled", data_dir=data_dir).labels is None
    assert sources.load_tfds(name, "train[:3]", data_dir=data_dir).num_examples == 3
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(name, "validation", data_dir=data_dir)
    assert_one_line(excinfo, "no split 'validation'", "train, unlabelled")
    with pytest.raises(ValueError) as excinfo:
        sources.load_tfds(name, "train", data_dir=data_dir, max_gib=1e-9, read="memory")
    assert_one_line(excinfo, "GiB in memory")


def test_tfds_not_prepared_is_fast_and_one_line(tfds, tmp_path):
    for name, extra in [("cifar10", ""), ("imagenet2012", "manual download")]:
        start = time.monotonic()
        with pytest.raises(ValueError) as excinfo:
            sources.load_tfds(name, "train", data_dir=tmp_path)
        assert time.monotonic() - start < 5
        assert_one_line(excinfo, f"TFDS dataset '{name}' (split 'train') is not prepared in",
                        f"tfds build {name} --data_dir {tmp_path}", extra)
    for name, fragment in [("cifar1O", "unknown TFDS dataset 'cifar1O'"),
                           ("huggingface:foo", "needs the network"),
                           ("mnist/nosuchconfig", "cannot open TFDS dataset")]:
        with pytest.raises(ValueError) as excinfo:
            sources.load_tfds(name, "train", data_dir=tmp_path)
        assert_one_line(excinfo, fragment)


def test_importing_sources_does_not_import_tensorflow():
    code = ("import sys, jaxssl.data.sources; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ---------------------------------------------------------------------------------------------
# Built-in dataset and the registry


def test_builtin_is_fast_deterministic_and_balanced():
    start = time.monotonic()
    images, labels = builtin.make_shapes(1000, builtin.SPLITS["test"][1])
    assert time.monotonic() - start < 2
    test = sources.load_builtin("test")
    np.testing.assert_array_equal(test.images, images)  # the cached split equals a fresh draw
    np.testing.assert_array_equal(test.labels, labels)
    train = sources.load_builtin("train")
    assert sources.load_builtin("train") is train
    assert train.images.shape == (5000, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 100))
    assert train.class_names == builtin.CLASS_NAMES and len(set(train.class_names)) == 10
    assert not train.images.flags.writeable
    assert not np.array_equal(train.images[:1000], test.images)
    with pytest.raises(ValueError) as excinfo:
        sources.load_builtin("val")
    assert_one_line(excinfo, "train, test")


def _nearest(train_x, train_y, test_x):
    train_x, test_x = train_x.astype(np.float32), test_x.astype(np.float32)
    d = (test_x ** 2).sum(1)[:, None] - 2 * test_x @ train_x.T + (train_x ** 2).sum(1)[None]
    return train_y[d.argmin(1)]


def test_builtin_colour_is_a_nuisance_and_shape_the_signal():
    train, test = sources.load_builtin("train"), sources.load_builtin("test")
    # Nearest class mean on each image's mean colour: near chance (10%).
    colour = lambda s: s.images.reshape(s.num_examples, -1, 3).mean(1)  # noqa: E731
    means = np.stack([colour(train)[train.labels == c].mean(0) for c in range(10)])
    guess = ((colour(test)[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (guess == test.labels).mean() < 0.3

    # 1-NN on colour-blind edge maps (gradient magnitude of grey, scaled to max 1) finds shape.
    def edges(s):
        g = s.images.astype(np.float32).mean(-1)
        e = np.abs(np.diff(g, axis=1))[:, :, :-1] + np.abs(np.diff(g, axis=2))[:, :-1, :]
        return (e / (e.max(axis=(1, 2), keepdims=True) + 1e-6)).reshape(s.num_examples, -1)
    accuracy = (_nearest(edges(train), train.labels, edges(test)) == test.labels).mean()
    assert accuracy > 0.4


def test_load_source_registry():
    assert list(sources.SOURCES) == ["builtin", "cifar10_npz", "folder", "tfds", "records"]
    assert sources.load_source("builtin", split="test") is sources.load_builtin("test")
    with pytest.raises(ValueError) as excinfo:
        sources.load_source("hdf5", path="x")
    assert_one_line(excinfo, "'hdf5'", "builtin, cifar10_npz, folder, tfds, records")


def test_tensorflow_never_sees_accelerators():
    from jaxssl.data.tf_import import tf

    T = tf()
    assert T.config.get_visible_devices("GPU") == []


def test_folder_path_with_tilde_is_expanded(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "pics" / "a.png")
    source = sources.load_folder("~/pics", labelled=False)
    assert source.num_examples == 1 and source.read([0])[0].shape == (4, 5, 3)
