"""Host (tf.data) and device (JAX) versions of each recipe agree in distribution.

Both draw their random numbers from different generators, so single outputs differ; over many
draws on one fixed image, the statistics of the views must agree. Statistics per draw: the
view's colour, contrast, saturation, grayness, gradient and high-frequency energy, and its
mean colour's opponent components (see `_stats`), each moved by one of the ops. Their averages
over DRAWS draws agree within 4.5 standard errors (plus 1e-3 for float32 differences between
the two implementations, far below the sampling noise), for whole recipes and, with more draws,
for each random op alone. Checked when written: changing one parameter on the device side only
(grayscale p 0.2 -> 0.3, hue 0.2 -> 0.15, crop scale 0.08 -> 0.15, saturation, contrast or
brightness 0.8 -> 0.6, solarize p 0.2 -> 0.3, flip p 0.5 -> 0.3) makes the single-op test
fail; blur p 0.5 -> 0.35 at 40 px is below its power.
"""

import jax
import numpy as np
import pytest

from jaxssl.data import augment_jax, recipes

DRAWS = 400  # whole recipes; single ops use ISOLATED_DRAWS
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image():
    # A smooth colourful image with structure, 56x64, fixed.
    y, x = np.mgrid[0:56, 0:64] / 64.0
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y - x),
                    0.3 + 0.6 * x * y], axis=-1)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _stats(views):
    """Statistics per draw that each op moves: [DRAWS, 16] float64."""
    v = np.asarray(views, np.float64) * STD[0] + MEAN[0]  # back to [0, 1] units
    means = v.mean(axis=(1, 2))  # colour (brightness, hue, solarize)
    stds = v.std(axis=(1, 2))  # contrast
    chroma = v.std(axis=3).mean(axis=(1, 2))  # saturation
    gray = (v.std(axis=3).max(axis=(1, 2)) < 1e-3).astype(np.float64)  # grayscale
    grad = np.abs(np.diff(v, axis=2)).mean(axis=(1, 2, 3))  # crop scale (zoom smooths)
    lap = np.abs(v[:, 1:-1, 1:-1] * 4 - v[:, 2:, 1:-1] - v[:, :-2, 1:-1] - v[:, 1:-1, 2:]
                 - v[:, 1:-1, :-2]).mean(axis=(1, 2, 3))  # blur (high frequencies)
    opp_a = means[:, 0] - means[:, 1]  # opponent colours of the mean: hue rotation spreads them
    opp_b = (means[:, 0] + means[:, 1]) / 2 - means[:, 2]
    half = v.shape[2] // 2
    tilt = v[:, :, :half].mean(axis=(1, 2, 3)) - v[:, :, half:].mean(axis=(1, 2, 3))  # flip
    return np.column_stack([means, stds, chroma, gray, grad, lap, tilt, opp_a, opp_b,
                            opp_a * opp_b, np.sqrt(opp_a ** 2 + opp_b ** 2)])


def _device(recipe, out_size, draws=DRAWS):
    aug = jax.jit(augment_jax.make_device_augment(recipe, out_size, MEAN, STD))
    images = np.repeat(_image()[None], draws, axis=0)
    x1, x2 = aug(images, jax.random.split(jax.random.key(0), draws))
    return _stats(x1), _stats(x2)


def _host(recipe, out_size, draws=DRAWS):
    from jaxssl.data import augment_tf
    from jaxssl.data.tf_import import tf

    T = tf()
    image = T.constant(_image())
    seeds = T.data.Dataset.range(draws).map(lambda i: T.stack([T.constant(7, T.int64), i]))
    ds = seeds.map(lambda s: augment_tf.two_views(image, s, recipe, out_size, "host", MEAN, STD))
    v1, v2 = zip(*ds.as_numpy_iterator())
    return _stats(np.stack(v1)), _stats(np.stack(v2))


def _assert_same_distribution(recipe, out_size, label, draws=DRAWS):
    for dev, host in zip(_device(recipe, out_size, draws), _host(recipe, out_size, draws)):
        # First and second moments of every statistic (the second catches a wrong spread).
        centre = (dev.mean(axis=0) + host.mean(axis=0)) / 2
        dev = np.concatenate([dev, (dev - centre) ** 2], axis=1)
        host = np.concatenate([host, (host - centre) ** 2], axis=1)
        se = np.sqrt(dev.var(axis=0) / draws + host.var(axis=0) / draws)
        gap = np.abs(dev.mean(axis=0) - host.mean(axis=0))
        assert np.all(gap <= 4.5 * se + 1e-3), (label, np.round(gap / (se + 1e-12), 1))


@pytest.mark.parametrize("name,out_size", [("simclr", 48), ("simclr_cifar", 32), ("mocov2", 48),
                                           ("byol", 48)])
def test_recipes_agree_in_distribution(name, out_size):
    _assert_same_distribution(recipes.get_recipe(name), out_size, name)


ISOLATED_DRAWS = 2000
_NOTHING = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, brightness=0.0,
                contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                blur_prob=0.0, solarize_prob=0.0)
ISOLATED = {
    "crop": dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)),
    "flip": dict(flip_prob=0.5),
    "brightness": dict(brightness=0.8, jitter_prob=0.8),
    "contrast": dict(contrast=0.8, jitter_prob=0.8),
    "saturation": dict(saturation=0.8, jitter_prob=0.8),
    "hue": dict(hue=0.2, jitter_prob=0.8),
    "jitter_order": dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_prob=1.0),
    "grayscale": dict(grayscale_prob=0.2),
    "blur": dict(blur_prob=0.5),
    "solarize": dict(solarize_prob=0.2),
}


@pytest.mark.parametrize("op", sorted(ISOLATED))
def test_each_random_op_agrees_in_distribution(op):
    # One op random at a time, everything else off: far more power per op than whole recipes.
    view = recipes.ViewRecipe(**{**_NOTHING, **ISOLATED[op]})
    _assert_same_distribution(recipes.Recipe(op, view, view), 40, op, draws=ISOLATED_DRAWS)
