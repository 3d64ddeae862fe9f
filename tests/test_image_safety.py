"""Hostile image files (issue 14): a file is read only as the format its extension names, an
image over max_pixels is refused from its header before any pixel is decoded, and decodes in
flight are bounded whatever the core count."""

import os
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from jaxssl.data import folder, sources

# Enough for Pillow to identify EPS; loading it would run Ghostscript.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height, about 1/1000 of its bytes on disk (zlib
    on zero rows): a small-file decompression bomb, written by hand because Pillow would need
    the whole image in memory to save it."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(1000, height - y)) for y in range(0, height, 1000))
    idat += z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture
def loads(monkeypatch):
    """The sizes of the images Pillow decodes (ImageFile.load) while the test runs."""
    sizes, original = [], ImageFile.ImageFile.load

    def load(im):
        sizes.append(im.size)
        return original(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_eps_named_png_is_a_bad_file_and_ghostscript_never_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "a.png").write_bytes(EPS)

    with pytest.warns(UserWarning, match="skipped 1 of 2") as record:
        source = sources.load_folder(tmp_path)
    assert "a.png (not a PNG file" in str(record[0].message)
    assert source.num_examples == 1 and source.paths[0].endswith("good.png")
    [(path, reason)] = source.skipped
    assert path.endswith("a.png") and reason.startswith("not a PNG file") and "\n" not in reason
    with pytest.raises(ValueError) as excinfo:
        sources.load_folder(tmp_path, strict=True)
    message = str(excinfo.value)
    assert "a.png" in message and "not a PNG file" in message and "\n" not in message
    assert calls == []


def test_a_jpeg_extension_reads_jpeg_and_mpo_only(tmp_path):
    Image.new("RGB", (6, 5), (200, 0, 0)).save(tmp_path / "photo.jpg", quality=95)
    assert folder.decode_rgb(tmp_path / "photo.jpg").shape == (5, 6, 3)
    # A camera's multi-picture JPEG: the first picture.
    Image.new("RGB", (6, 5), (200, 0, 0)).save(tmp_path / "camera.jpg", format="MPO", save_all=True,
                                               append_images=[Image.new("RGB", (6, 5))])
    with Image.open(tmp_path / "camera.jpg") as im:
        assert im.format == "MPO"
    first = folder.decode_rgb(tmp_path / "camera.jpg")
    np.testing.assert_allclose(first[0, 0], (200, 0, 0), atol=8)
    Image.new("RGB", (6, 5)).save(tmp_path / "png_inside.jpg", format="PNG")
    with pytest.raises(ValueError, match="png_inside.jpg: not a JPEG file"):
        folder.decode_rgb(tmp_path / "png_inside.jpg")
    assert set(folder.IMAGE_FORMATS) == set(folder.IMAGE_EXTENSIONS)


def test_an_extension_pillow_does_not_know_is_an_error_up_front(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no image format by the extension '.xyz'"):
        sources.load_folder(tmp_path, extensions=(".png", ".xyz"))
    Image.new("RGB", (4, 4)).save(tmp_path / "b.tif")  # not a default, but Pillow's for .tif
    assert sources.load_folder(tmp_path, extensions=(".png", ".tif")).num_examples == 2


def test_an_image_over_max_pixels_is_never_decoded(tmp_path, loads):
    # 8200 x 8200 = 67.2M pixels: just over MAX_PIXELS, under Pillow's own warning (89.5M), so
    # only jaxssl's header check stands between this 8 KB file and a 270 MB decode.
    assert 8192 * 8192 < 8200 * 8200 < Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(_bilevel_png(8200, 8200))
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")

    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        source = sources.load_folder(tmp_path)
    [(path, reason)] = source.skipped
    assert path.endswith("bomb.png") and "\n" not in reason
    assert "8200 x 8200 = 67,240,000 pixels, over the limit of 67,108,864" in reason
    assert "max_pixels" in reason and folder.MAX_PIXELS == 8192 * 8192
    assert set(loads) == {(4, 4)}  # only good.png was decoded
    with pytest.raises(ValueError, match="bomb.png: 8200 x 8200"):
        folder.decode_rgb(tmp_path / "bomb.png")
    assert (8200, 8200) not in loads


def test_max_pixels_is_settable_and_read_applies_it(tmp_path, loads):
    (tmp_path / "big.png").write_bytes(_bilevel_png(3000, 2000))  # 6M pixels
    Image.new("RGB", (4, 4)).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        source = sources.load_folder(tmp_path, max_pixels=1_000_000)
    assert "3000 x 2000 = 6,000,000 pixels, over the limit of 1,000,000" in source.skipped[0][1]
    assert (3000, 2000) not in loads

    source = sources.load_folder(tmp_path, max_pixels=6_000_000)
    assert source.num_examples == 2 and source.max_pixels == 6_000_000
    big = source.read([0])[0]
    assert big.shape == (2000, 3000, 3) and big.dtype == np.uint8 and not big.any()
    with pytest.raises(ValueError, match="over the limit of 5,999,999"):
        folder.read_files([source.paths[0]], max_pixels=5_999_999)
    with pytest.raises(ValueError, match="max_pixels must be a positive number"):
        sources.load_folder(tmp_path, max_pixels=0)


def test_pillow_refusing_a_huge_header_gives_the_same_reason(tmp_path, loads):
    # 20000 x 20000 = 400M pixels: over Pillow's own error limit, which Image.open raises before
    # jaxssl sees the size; the reason must still be jaxssl's, naming the limit and the knob.
    assert 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    (tmp_path / "huge.png").write_bytes(_bilevel_png(20000, 20000))
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        source = sources.load_folder(tmp_path)
    reason = source.skipped[0][1]
    assert "400,000,000 pixels, over the limit of" in reason and "max_pixels" in reason
    # Allowed by max_pixels but not by Pillow: say which limit to raise as well.
    with pytest.raises(ValueError, match="over Pillow's own limit .*MAX_IMAGE_PIXELS"):
        folder.decode_rgb(tmp_path / "huge.png", max_pixels=10 ** 9)
    assert (20000, 20000) not in loads


def test_pillow_bomb_warning_cannot_preempt_the_check(tmp_path, loads):
    # 9500 x 9500 = 90.25M pixels: Image.open warns (over PIL.Image.MAX_IMAGE_PIXELS) before
    # jaxssl sees the size; the file is still refused by the header check, with jaxssl's reason,
    # and also when warnings are errors (python -W error).
    assert Image.MAX_IMAGE_PIXELS < 9500 * 9500 < 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "warned.png"
    path.write_bytes(_bilevel_png(9500, 9500))
    want = "9500 x 9500 = 90,250,000 pixels, over the limit of 67,108,864"
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ValueError, match=want):
            folder.decode_rgb(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="90,250,000 pixels, over the limit of 67,108,864"):
            folder.decode_rgb(path)
    assert loads == []


def _concurrency(monkeypatch, cpus: int, **kwargs):
    """(most calls running at once, most submitted and not yet consumed, results) of a
    parallel_map over 64 slow items, consumed slowly, with os.cpu_count() = cpus."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    lock = threading.Lock()
    running, started, consumed = [0], [0], [0]
    most_running, most_ahead = [0], [0]

    def fn(x):
        with lock:
            running[0] += 1
            started[0] += 1
            most_running[0] = max(most_running[0], running[0])
            most_ahead[0] = max(most_ahead[0], started[0] - consumed[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return x * x

    results = []
    for r in folder.parallel_map(fn, range(64), **kwargs):
        results.append(r)
        with lock:
            consumed[0] += 1
        time.sleep(0.002)
    return most_running[0], most_ahead[0], results


def test_parallel_map_bounds_calls_in_flight_whatever_the_core_count(monkeypatch):
    running, ahead, results = _concurrency(monkeypatch, cpus=64)
    assert results == [x * x for x in range(64)]  # in order, every item once
    assert 1 < running <= 8
    assert ahead <= 2 * 8
    assert folder.DECODE_THREADS == 8

    running, ahead, results = _concurrency(monkeypatch, cpus=64, num_threads=3)
    assert results == [x * x for x in range(64)] and 1 < running <= 3 and ahead <= 6
    running, _, results = _concurrency(monkeypatch, cpus=64, num_threads=1)
    assert results == [x * x for x in range(64)] and running == 1


def test_config_data_max_pixels_reaches_load_folder(tmp_path):
    from jaxssl import configuration, experiment

    Image.new("RGB", (4, 4)).save(tmp_path / "big.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "small.png")
    config = configuration.default_config()
    assert config.data.max_pixels == 0  # 0: folder.MAX_PIXELS
    configuration.apply_overrides(config, [("data.source", "folder"), ("data.path", str(tmp_path)),
                                           ("data.max_pixels", "4")])
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        source, _ = experiment.load_data(config.data, with_eval=False, training=False)
    assert source.num_examples == 1 and source.max_pixels == 4
    assert "4 x 4 = 16 pixels, over the limit of 4" in source.skipped[0][1]
    configuration.apply_overrides(config, [("data.max_pixels", "-1")])
    with pytest.raises(configuration.ConfigError, match="max_pixels must be a positive number"):
        experiment.load_data(config.data, with_eval=False, training=False)


def test_cifar10_npz_refuses_an_image_of_another_size_before_decoding(tmp_path, loads):
    import io

    blobs = []
    for size in [(32, 32), (8200, 8200)]:
        buffer = io.BytesIO()
        Image.new("L", size).save(buffer, "JPEG")
        blobs.append(buffer.getvalue())
    np.savez(tmp_path / "c.npz", test_jpeg=np.frombuffer(b"".join(blobs), np.uint8),
             test_offsets=np.cumsum([0] + [len(b) for b in blobs]), y_test=np.zeros(2, np.int64),
             classes=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="test image 1 is 8200 x 8200, not 32 x 32"):
        sources.load_cifar10_npz(tmp_path / "c.npz", split="test")
    assert (8200, 8200) not in loads


def test_the_cli_says_a_skipped_file_in_one_line_of_its_own(tmp_path, capsys):
    """A library caller gets a Python warning (a UserWarning subclass); the command line prints
    the same message as one line in jaxssl's voice, without Python's file:line and source."""
    from jaxssl import JaxsslWarning, cli

    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image\nat all")
    with pytest.warns(JaxsslWarning, match="skipped 1 of 2"):
        sources.load_folder(tmp_path)
    capsys.readouterr()
    with cli._own_warnings():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            sources.load_folder(tmp_path)
    err = capsys.readouterr().err
    assert err.startswith("jaxssl: warning: load_folder skipped 1 of 2 image files under ")
    assert err.count("\n") == 1 and "bad.png (" in err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err
