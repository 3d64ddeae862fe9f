"""Device (JAX) augmentation ops against the float64 numpy references, with fixed parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import aug_reference as ref
from jaxssl import parallel, steps
from jaxssl.data import augment_jax as A
from jaxssl.data import recipes

RNG = np.random.default_rng(0)
IMG = RNG.uniform(size=(13, 17, 3))  # odd, non-square on purpose
IMG32 = IMG.astype(np.float32)
ATOL = 2e-6  # float32 against float64
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.mark.parametrize("f", [0.0, 0.4, 1.0, 1.7])
def test_brightness_contrast_saturation(f):
    np.testing.assert_allclose(A.adjust_brightness(IMG32, f), ref.brightness(IMG, f), atol=ATOL)
    np.testing.assert_allclose(A.adjust_contrast(IMG32, f), ref.contrast(IMG, f), atol=ATOL)
    np.testing.assert_allclose(A.adjust_saturation(IMG32, f), ref.saturation(IMG, f), atol=ATOL)


@pytest.mark.parametrize("d", [0.0, 0.1, -0.2, 0.5, -0.45])
def test_hue_matches_colorsys(d):
    np.testing.assert_allclose(A.adjust_hue(IMG32, d), ref.hue(IMG, d), atol=1e-5)


def test_hue_on_grey_and_saturated_pixels():
    img = np.array([[[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.9, 0.9]]])
    for d in (0.25, -1 / 3):
        np.testing.assert_allclose(A.adjust_hue(img.astype(np.float32), d), ref.hue(img, d), atol=1e-6)


def test_grayscale_matches_numpy_and_pillow():
    from PIL import Image

    np.testing.assert_allclose(A.to_grayscale(IMG32), ref.grayscale(IMG), atol=ATOL)
    u8 = (IMG * 255).round().astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).convert("L"), np.float64)
    # Pillow computes luma in fixed point and rounds to uint8: within one grey level.
    ours = np.asarray(A.to_grayscale(u8.astype(np.float32)))[..., 0]
    assert np.abs(ours - pil).max() <= 1.0


@pytest.mark.parametrize("sigma,k", [(0.1, 3), (0.8, 5), (2.0, 9), (1.3, 13)])
def test_blur(sigma, k):
    np.testing.assert_allclose(A.gaussian_blur(IMG32, sigma, k), ref.blur(IMG, sigma, k), atol=ATOL)


def test_blur_large_kernel_non_square_and_per_example_sigma():
    """The 224 px recipe's kernel (23) on a small non-square image, where the reflect padding
    folds back across most of each side, and under vmap with one sigma per example (as
    make_device_augment runs it), against float64 numpy."""
    rng = np.random.default_rng(7)
    imgs = rng.random((3, 24, 13, 3))
    sigmas = np.array([0.1, 1.05, 2.0])
    out = jax.jit(jax.vmap(lambda x, s: A.gaussian_blur(x, s, 23)))(
        imgs.astype(np.float32), sigmas.astype(np.float32))
    for i in range(3):
        np.testing.assert_allclose(out[i], ref.blur(imgs[i], sigmas[i], 23), atol=ATOL)


def test_solarize_and_flip():
    np.testing.assert_allclose(A.solarize(IMG32), ref.solarize(IMG), atol=ATOL)
    np.testing.assert_array_equal(A.flip(IMG32), ref.flip(IMG32))


@pytest.mark.parametrize("box,out", [((2, 3, 8, 9), (5, 4)), ((0, 0, 13, 17), (24, 20)),
                                     ((4, 1, 5, 7), (16, 16)), ((1, 2, 6, 6), (6, 6))])
def test_crop_resize(box, out):
    got = A.crop_resize(IMG32, *box, *out)
    np.testing.assert_allclose(got, ref.crop_resize(IMG, *box, *out), atol=ATOL)
    if box[2:] == out:  # scale 1: a pure crop, exact
        y0, x0, h, w = box
        np.testing.assert_array_equal(got, IMG32[y0:y0 + h, x0:x0 + w])


def test_crop_resize_matches_pillow_on_pure_crop_and_upscale_grid():
    from PIL import Image

    u8 = (IMG * 255).round().astype(np.uint8)
    crop = np.asarray(A.crop_resize(u8, 2, 3, 8, 9, 8, 9))
    np.testing.assert_array_equal(crop, np.asarray(Image.fromarray(u8).crop((3, 2, 12, 10)), np.float32))


def test_sample_crop_bounds_and_distribution():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    keys = jax.random.split(jax.random.key(0), 2000)
    y0, x0, h, w = jax.vmap(lambda k: A.sample_crop(k, 40, 60, scale, ratio))(keys)
    y0, x0, h, w = map(np.asarray, (y0, x0, h, w))
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 40).all() and (x0 + w <= 60).all()
    assert (h > 0).all() and (w > 0).all()
    frac = h * w / (40 * 60)
    # Rounding h and w moves area and ratio a little off the bounds: allow a pixel's worth.
    assert frac.min() > 0.05 and frac.max() <= 1.0
    assert (w / h).min() > 0.6 and (w / h).max() < 1.6
    # Area is uniform in scale, minus tries that did not fit: mean a bit below 0.54.
    assert 0.4 < frac.mean() < 0.56
    assert len(set(zip(y0.tolist(), x0.tolist()))) > 500
    again = A.sample_crop(keys[0], 40, 60, scale, ratio)
    assert tuple(int(v) for v in again) == (y0[0], x0[0], h[0], w[0])


def test_sample_crop_fallback_is_centred():
    # Ratio far from the image's (a 10x100 strip) with scale 1: nothing fits, so the fallback:
    # the whole width clipped to ratio 4/3 is impossible; height-limited centre crop.
    y0, x0, h, w = A.sample_crop(jax.random.key(1), 10, 100, (1.0, 1.0), (3 / 4, 4 / 3))
    assert (int(h), int(w)) == (10, 13) and int(y0) == 0 and int(x0) == (100 - 13) // 2


def _identity_view():
    return recipes.ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                              jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def test_augment_view_probabilities_and_normalisation():
    u8 = (RNG.uniform(size=(16, 16, 3)) * 255).round().astype(np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = A.augment_view(jax.random.key(0), u8, _identity_view(), 16, recipes.DEVICE_OPS["device"],
                         mean, std)
    np.testing.assert_allclose(out, ref.normalise(u8 / 255.0, mean, std), atol=1e-5)
    always = recipes.ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0,
                                jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0,
                                solarize_prob=1.0)
    out = A.augment_view(jax.random.key(0), u8, always, 16, recipes.DEVICE_OPS["device"], (0, 0, 0),
                         (1, 1, 1))
    expected = ref.solarize(ref.grayscale(ref.flip(u8 / 255.0)))
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_device_augment_shapes_and_determinism(name):
    recipe = recipes.get_recipe(name)
    images = RNG.integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
    keys = jax.random.split(jax.random.key(0), 4)
    aug = jax.jit(A.make_device_augment(recipe, 36, (0.5,) * 3, (0.25,) * 3))
    x1, x2 = aug(images, keys)
    assert x1.shape == x2.shape == (4, 36, 36, 3) and x1.dtype == jnp.float32
    assert np.isfinite(np.asarray(x1)).all()
    y1, y2 = aug(images, keys)
    np.testing.assert_array_equal(x1, y1)
    assert not np.allclose(x1, x2), "the two views must differ"
    z1, _ = aug(images, jax.random.split(jax.random.key(1), 4))
    assert not np.allclose(x1, z1)


def test_jit_vmap_equals_one_image_at_a_time():
    # Regression: XLA:CPU once corrupted pixels of jit(vmap(...)) of the colour stage.
    recipe = recipes.get_recipe("simclr")
    image = RNG.integers(0, 256, size=(56, 64, 3), dtype=np.uint8)
    keys = jax.random.split(jax.random.key(5), 6)
    batched = jax.jit(jax.vmap(lambda k: A.augment_view(k, image, recipe.view1, 40,
                                                         recipes.DEVICE_OPS["device"], MEAN, STD)))(keys)
    for k, out in zip(keys, batched):
        one = A.augment_view(k, image, recipe.view1, 40, recipes.DEVICE_OPS["device"], MEAN, STD)
        np.testing.assert_allclose(out, one, atol=1e-4)


def test_split_mode_takes_two_host_views_and_skips_geometry():
    view = recipes.ViewRecipe(jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    recipe = recipes.Recipe("t", view, view)
    v1 = RNG.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    v2 = RNG.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    aug = A.make_device_augment(recipe, 8, (0, 0, 0), (1, 1, 1), mode="split", dtype=jnp.bfloat16)
    x1, x2 = aug((v1, v2), jax.random.split(jax.random.key(0), 2))
    assert x1.dtype == jnp.bfloat16
    # No crop or flip here (the host did them): just grayscale of each given view.
    np.testing.assert_allclose(np.asarray(x1, np.float32), ref.grayscale(v1[0:2] / 255.0)[None][0], atol=1e-2)
    np.testing.assert_allclose(np.asarray(x2, np.float32), np.stack([ref.grayscale(v / 255.0) for v in v2]), atol=1e-2)
    with pytest.raises(ValueError, match="'device' or 'split'"):
        A.make_device_augment(recipe, 8, (0, 0, 0), (1, 1, 1), mode="host")


def test_sharded_device_augmentation_equals_single_device():
    mesh = parallel.make_mesh()
    aug = A.make_device_augment(recipes.get_recipe("simclr"), 16, (0.5,) * 3, (0.25,) * 3)
    images = RNG.integers(0, 256, size=(16, 20, 20, 3), dtype=np.uint8)

    def run(images, axis_name):
        keys = steps.example_keys(jax.random.key(0), jnp.int32(3), images.shape[0], axis_name)
        return aug(images, keys)

    sharded = jax.jit(jax.shard_map(functools.partial(run, axis_name=parallel.DATA_AXIS), mesh=mesh,
                                    in_specs=P("data"), out_specs=P("data")))(images)
    single = jax.jit(functools.partial(run, axis_name=None))(images)
    # Same keys, so the same random decisions; XLA may fuse a batch of 2 and one of 16
    # differently, hence float32 rounding differences only.
    for a, b in zip(sharded, single):
        np.testing.assert_allclose(a, b, atol=1e-5)
