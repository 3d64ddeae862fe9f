"""Host (TensorFlow) augmentation against the float64 numpy references of tests/aug_reference.py.

Images are random, parameters fixed; tolerance 1e-5 on [0, 1] images (float32 arithmetic).
"""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import aug_reference as ref
from jaxssl.data import augment_tf as A
from jaxssl.data import recipes
from jaxssl.data.tf_import import tf

ATOL = 1e-5
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
# Normalised outputs divide float32 errors by std (>= 0.2), so they get 1e-5 / 0.2.
NORM_ATOL = ATOL / min(STD)
HOST, SPLIT = recipes.HOST_OPS["host"], recipes.HOST_OPS["split"]
# Every probability 0 and a crop that is the whole (square) image: the view is only the
# resize and the normalisation; tests switch single ops on from here.
IDENTITY = recipes.ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                              jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                              solarize_prob=0.0, blur_min_side=8)


def _image(h=17, w=23, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def _uint8(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _np(t):
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t)


def test_import_does_not_load_tensorflow():
    code = ("import sys, jaxssl.data.augment_tf; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'tensorflow']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ------------------------------------------------------------------------------------- ops

@pytest.mark.parametrize("f", [0.0, 0.3, 1.0, 1.7])
def test_brightness(f):
    x = _image()
    np.testing.assert_allclose(_np(A.adjust_brightness(x, f)), ref.brightness(x, f), atol=ATOL)


@pytest.mark.parametrize("f", [0.0, 0.2, 1.5, 1.8])
def test_contrast(f):
    x = _image()
    np.testing.assert_allclose(_np(A.adjust_contrast(x, f)), ref.contrast(x, f), atol=ATOL)


@pytest.mark.parametrize("f", [0.0, 0.5, 1.0, 1.8])
def test_saturation(f):
    x = _image()
    np.testing.assert_allclose(_np(A.adjust_saturation(x, f)), ref.saturation(x, f), atol=ATOL)


@pytest.mark.parametrize("d", [0.0, 0.1, -0.3, 0.45, -0.5, 0.9, -0.95, 1.25, -1.6])
def test_hue(d):
    x = _image(12, 10)
    # Grey, black, white and pure hues: the HSV edge cases (s = 0, v = 0, h on a sector edge).
    x[0, :6] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]]
    np.testing.assert_allclose(_np(A.adjust_hue(x, d)), ref.hue(x, d), atol=ATOL)


def test_hue_with_tensor_shift_in_graph():
    x = _image(12, 10)
    fn = tf().function(A.adjust_hue)
    np.testing.assert_allclose(_np(fn(x, tf().constant(-0.7))), ref.hue(x, -0.7), atol=ATOL)


def test_grayscale():
    x = _image()
    np.testing.assert_allclose(_np(A.to_grayscale(x)), ref.grayscale(x), atol=ATOL)


def test_grayscale_matches_pillow():
    from PIL import Image

    img = _uint8(17, 23)
    ours = _np(A.to_grayscale(img.astype(np.float32) / 255))[..., 0]
    pil = np.asarray(Image.fromarray(img).convert("L"), np.float64) / 255
    # Pillow computes the same ITU-R 601 luma in fixed point and rounds it to uint8, so the two
    # differ by at most half a grey level plus the fixed-point error: within 1/255.
    np.testing.assert_allclose(ours, pil, atol=1 / 255)


@pytest.mark.parametrize("k", [3, 5, 9])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_blur(sigma, k):
    x = _image()
    np.testing.assert_allclose(_np(A.gaussian_blur(x, sigma, k)), ref.blur(x, sigma, k),
                               atol=ATOL)


def test_blur_dynamic_shape_in_graph():
    # Non-square and unknown sizes: separate row and column matrices built at run time.
    T = tf()
    fn = T.function(lambda x, s: A.gaussian_blur(x, s, 7),
                    input_signature=[T.TensorSpec([None, None, 3], T.float32),
                                     T.TensorSpec([], T.float32)])
    for h, w in [(12, 10), (9, 31)]:
        x = _image(h, w)
        np.testing.assert_allclose(_np(fn(x, 1.7)), ref.blur(x, 1.7, 7), atol=ATOL)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize(threshold):
    x = _image()
    x[0, 0] = [threshold, 0.0, 1.0]  # the threshold itself is solarised (x >= threshold)
    np.testing.assert_allclose(_np(A.solarize(x, threshold)), ref.solarize(x, threshold),
                               atol=1e-7)


def test_flip():
    x = _uint8(5, 7)
    np.testing.assert_array_equal(_np(A.flip(x)), ref.flip(x))


@pytest.mark.parametrize("box,out", [
    ((2, 3, 12, 15), (5, 7)),  # downscale, different factors per axis
    ((1, 1, 5, 4), (13, 11)),  # upscale: the edge clamp matters
    ((0, 0, 17, 23), (8, 30)),  # whole image, down in y and up in x
    ((4, 6, 3, 9), (3, 9)),  # scale 1: a pure crop
])
def test_crop_resize(box, out):
    x = _image()
    got = _np(A.crop_resize(x, *box, *out))
    want = ref.crop_resize(x, *box, *out)
    assert got.dtype == np.float32 and got.shape == (*out, 3)
    if out == box[2:]:
        np.testing.assert_array_equal(got, want.astype(np.float32))
    else:
        np.testing.assert_allclose(got, want, atol=ATOL)


def test_crop_resize_uint8_keeps_scale():
    x = _uint8(17, 23)
    got = _np(A.crop_resize(x, 2, 1, 11, 13, 9, 20))
    assert got.dtype == np.float32
    # 0..255 values: float32 error scales by 255.
    np.testing.assert_allclose(got, ref.crop_resize(x, 2, 1, 11, 13, 9, 20), atol=255 * ATOL)


# ------------------------------------------------------------------------------------- crop

def _ref_crop(u, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params in plain Python, fed with our draws u [22]."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        r = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w, True
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, False


_CROP_CASES = [(32, 32, (0.08, 1.0), (3 / 4, 4 / 3)), (40, 100, (0.2, 1.0), (3 / 4, 4 / 3)),
               (100, 40, (0.5, 1.0), (0.5, 2.0)), (7, 5, (0.08, 1.0), (3 / 4, 4 / 3))]


@pytest.mark.parametrize("height,width,scale,ratio", _CROP_CASES)
def test_sample_crop_is_torchvisions_rule(height, width, scale, ratio):
    T = tf()
    fn = T.function(lambda s, h, w: A.sample_crop(s, h, w, scale, ratio))
    for i in range(60):
        seed = T.constant([i, 7], T.int64)
        u = T.random.stateless_uniform([22], seed, dtype=T.float64).numpy()
        y0, x0, h, w, found = _ref_crop(u, height, width, scale, ratio)
        got = [int(v) for v in fn(seed, T.constant(height), T.constant(width))]
        assert got == [y0, x0, h, w]
        assert 0 <= y0 and y0 + h <= height and 0 <= x0 and x0 + w <= width
        if found:  # within the bounds, up to rounding h and w to integers
            assert (h - 0.5) * (w - 0.5) <= scale[1] * height * width
            assert (h + 0.5) * (w + 0.5) >= scale[0] * height * width
            assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]


@pytest.mark.parametrize("height,width,expected", [
    (40, 100, (0, 23, 40, 53)),  # too wide: full height, width 40 * 4/3
    (100, 40, (23, 0, 53, 40)),  # too tall: full width, height 40 / (3/4)
    (50, 60, (0, 0, 50, 60)),  # ratio 1.2 within range: the whole image
])
def test_sample_crop_falls_back_to_centre(height, width, expected):
    # An area above the image's can never fit: every try fails.
    got = A.sample_crop([3, 4], height, width, (1.5, 2.0), (3 / 4, 4 / 3))
    assert tuple(int(v) for v in got) == expected


def test_sample_crop_deterministic_and_seed_dependent():
    a = [int(v) for v in A.sample_crop([1, 2], 64, 48, (0.08, 1.0), (0.75, 4 / 3))]
    b = [int(v) for v in A.sample_crop([1, 2], 64, 48, (0.08, 1.0), (0.75, 4 / 3))]
    c = [int(v) for v in A.sample_crop([1, 3], 64, 48, (0.08, 1.0), (0.75, 4 / 3))]
    assert a == b and a != c


def test_sample_crop_area_distribution():
    T = tf()
    height, width, scale, ratio = 120, 160, (0.08, 1.0), (3 / 4, 4 / 3)
    seeds = T.data.Dataset.range(2000).map(lambda i: T.stack([i, 11]))
    crops = seeds.map(lambda s: T.stack(A.sample_crop(s, height, width, scale, ratio)))
    crops = np.concatenate([c.numpy() for c in crops.batch(1000)])
    frac = crops[:, 2] * crops[:, 3] / (height * width)
    # The same rule with numpy draws (rejections bias the mean below the uniform's 0.54).
    rng = np.random.default_rng(0)
    ref_frac = np.array([(lambda c: c[2] * c[3])(_ref_crop(rng.random(22), height, width,
                                                           scale, ratio))
                         for _ in range(20000)]) / (height * width)
    assert abs(frac.mean() - ref_frac.mean()) < 0.025  # ~4 standard errors of 2000 draws
    assert frac.min() < 0.1 and frac.max() > 0.95
    assert len(np.unique(crops, axis=0)) > 1900


# ------------------------------------------------------------------------------------- views

def _view(image, view, seed=(1, 2), out=16, ops=HOST):
    return _np(A.augment_view(image, list(seed), view, out, ops, MEAN, STD))


def _base(image, out=16):
    """The p = 0 view of a square uint8 image on the [0, 1] scale (before normalising)."""
    h, w = image.shape[:2]
    return ref.crop_resize(image / 255.0, 0, 0, h, w, out, out)


def _unnormalise(x):
    return x * np.asarray(STD) + np.asarray(MEAN)


def test_all_probabilities_zero_is_resize_and_normalise():
    img = _uint8(20, 20)
    np.testing.assert_allclose(_view(img, IDENTITY), ref.normalise(_base(img), MEAN, STD),
                               atol=NORM_ATOL)
    # Without "crop" a non-square image is resized whole.
    img = _uint8(13, 29)
    got = _view(img, IDENTITY, ops=("flip", "colour"))
    np.testing.assert_allclose(got, ref.normalise(_base(img), MEAN, STD), atol=NORM_ATOL)


def test_split_mode_rounds_the_resized_crop():
    img = _uint8(20, 20)
    got = _view(img, IDENTITY, ops=SPLIT)
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    want = np.round(ref.crop_resize(img, 0, 0, 20, 20, 16, 16))
    # float32 vs float64 may fall on either side of a .5: at most one grey level, rarely.
    assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
    # Device mode does nothing on the host but the resize.
    assert _view(img, IDENTITY, ops=()).dtype == np.uint8


@pytest.mark.parametrize("kwargs,out,op", [
    (dict(flip_prob=1.0), 16, ref.flip),
    (dict(grayscale_prob=1.0), 16, ref.grayscale),
    (dict(solarize_prob=1.0), 16, ref.solarize),
    # kernel side 2 floor(0.1 * 40 / 2) + 1 = 5 at 40 px
    (dict(blur_prob=1.0, blur_sigma=(1.3, 1.3)), 40, lambda x: ref.blur(x, 1.3, 5)),
], ids=["flip", "grayscale", "solarize", "blur"])
def test_probability_one_applies_the_op(kwargs, out, op):
    img = _uint8(20, 20, seed=3)
    view = dataclasses.replace(IDENTITY, **kwargs)
    np.testing.assert_allclose(_unnormalise(_view(img, view, out=out)), op(_base(img, out)),
                               atol=ATOL)


@pytest.mark.parametrize("name,p", [("flip", 0.5), ("grayscale", 0.3), ("solarize", 0.2),
                                    ("jitter", 0.8)])
def test_probabilities_are_frequencies(name, p):
    T = tf()
    img = _uint8(20, 20, seed=8)
    view = dataclasses.replace(IDENTITY, **{f"{name}_prob": p})
    base = ref.normalise(_base(img), MEAN, STD)
    views = T.data.Dataset.range(400).map(
        lambda i: A.augment_view(img, T.stack([i, 9]), view, 16, HOST, MEAN, STD))
    views = next(iter(views.batch(400))).numpy()
    applied = np.abs(views - base).reshape(400, -1).max(axis=1) > 10 * NORM_ATOL
    # 400 draws: the standard deviation of the frequency is at most 0.025.
    assert abs(applied.mean() - p) < 0.1


def test_jitter_probability_one_brightness_only():
    img = _uint8(20, 20, seed=4)
    base = _base(img)
    view = dataclasses.replace(IDENTITY, jitter_prob=1.0, brightness=0.5, contrast=0.0,
                               saturation=0.0, hue=0.0)
    factors = []
    for i in range(5):
        got = _unnormalise(_view(img, view, seed=(i, 0)))
        keep = (got < 0.99) & (base > 0.05)  # unclipped pixels
        f = got[keep] / base[keep]
        np.testing.assert_allclose(f, f.mean(), atol=1e-4)  # one factor for the whole image
        factors.append(f.mean())
    assert all(0.5 <= f <= 1.5 for f in factors) and len(set(np.round(factors, 4))) == 5


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1)])
def test_jitter_order(order):
    x = _image(12, 10, seed=5)
    factors = (1.6, 0.4, 1.7, 0.3)
    view = recipes.ViewRecipe()
    got = _np(A._jitter(x, view, factors, tf().constant(order)))
    steps = [ref.brightness, ref.contrast, ref.saturation, ref.hue]
    want = x.astype(np.float64)
    for i in order:
        want = steps[i](want, factors[i])
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("mode", ["host", "split"])
def test_two_views_deterministic_shapes_and_seed_dependent(mode):
    img = _uint8(37, 45, seed=6)
    recipe = recipes.get_recipe("byol")
    a1, a2 = (_np(v) for v in A.two_views(img, [5, 6], recipe, 32, mode, MEAN, STD))
    b1, b2 = (_np(v) for v in A.two_views(img, [5, 6], recipe, 32, mode, MEAN, STD))
    c1, _ = (_np(v) for v in A.two_views(img, [5, 7], recipe, 32, mode, MEAN, STD))
    dtype = np.float32 if mode == "host" else np.uint8
    for v in (a1, a2, c1):
        assert v.dtype == dtype and v.shape == (32, 32, 3)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2) and not np.array_equal(a1, c1)


def test_two_views_uses_each_views_recipe():
    img = _uint8(24, 24, seed=7)
    recipe = recipes.Recipe("asym", IDENTITY, dataclasses.replace(IDENTITY, grayscale_prob=1.0))
    v1, v2 = (_unnormalise(_np(v)) for v in A.two_views(img, [0, 1], recipe, 16, "host",
                                                          MEAN, STD))
    np.testing.assert_allclose(v1, _base(img), atol=ATOL)
    np.testing.assert_allclose(v2, ref.grayscale(_base(img)), atol=ATOL)
    with pytest.raises(ValueError):
        A.two_views(img, [0, 1], recipe, 16, "device", MEAN, STD)


@pytest.mark.parametrize("mode", ["host", "split"])
def test_two_views_with_different_crop_parameters(mode):
    # The crops are then sampled one view at a time rather than together.
    img = _uint8(24, 24, seed=7)
    recipe = recipes.Recipe("asym", IDENTITY, dataclasses.replace(IDENTITY, crop_scale=(0.1, 0.5)))
    v1, v2 = (_np(v) for v in A.two_views(img, [0, 1], recipe, 16, mode, MEAN, STD))
    _, w2 = (_np(v) for v in A.two_views(img, [0, 1], recipe, 16, mode, MEAN, STD))
    np.testing.assert_array_equal(v2, w2)
    assert not np.array_equal(v1, v2)
    if mode == "host":
        np.testing.assert_allclose(_unnormalise(v1), _base(img), atol=ATOL)


@pytest.mark.parametrize("mode", ["host", "split"])
def test_inside_tf_data_with_varied_sizes(mode):
    T = tf()
    sizes = [(31, 47), (64, 40), (33, 33), (90, 120), (20, 25)]
    images = [_uint8(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    recipe = recipes.get_recipe("simclr")

    def dataset():
        ds = T.data.Dataset.from_generator(
            lambda: iter(images), output_signature=T.TensorSpec([None, None, 3], T.uint8))
        ds = ds.enumerate().map(
            lambda i, im: A.two_views(im, T.stack([i, 3]), recipe, 48, mode, MEAN, STD),
            num_parallel_calls=2, deterministic=True)
        return [tuple(v.numpy() for v in pair) for pair in ds]

    first, second = dataset(), dataset()
    dtype = np.float32 if mode == "host" else np.uint8
    assert len(first) == len(images)
    for (a1, a2), (b1, b2) in zip(first, second):
        assert a1.shape == a2.shape == (48, 48, 3) and a1.dtype == a2.dtype == dtype
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    # An eager call gives the views the traced one gave.
    e1, e2 = A.two_views(images[3], T.constant([3, 3], T.int64), recipe, 48, mode, MEAN, STD)
    np.testing.assert_allclose(_np(e1), first[3][0], atol=NORM_ATOL if mode == "host" else 0)
    np.testing.assert_allclose(_np(e2), first[3][1], atol=NORM_ATOL if mode == "host" else 0)
