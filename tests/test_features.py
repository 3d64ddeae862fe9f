"""Dataset features for the kNN monitor: eval-mode, sharded batches, padding, resizing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import models, parallel
from jaxssl.data import sources
from jaxssl.evaluate.features import FeatureExtractor, NonFiniteFeaturesError, eval_images
from tiny import IMAGE, tiny_model

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _setup():
    model = tiny_model(zero_init_last_bn=False)
    params, batch_stats = models.init_variables(model, jax.random.key(3), (1, IMAGE, IMAGE, 3))
    # Non-trivial running statistics, so eval mode (not batch statistics) is what is checked.
    batch_stats = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) / x.size,
                               batch_stats)
    images = np.random.default_rng(0).integers(0, 256, (37, IMAGE, IMAGE, 3), dtype=np.uint8)
    return model, params, batch_stats, sources.from_arrays(images)


def test_features_on_8_devices_equal_one_eval_mode_forward_pass():
    model, params, batch_stats, source = _setup()
    indices = np.array([5, 0, 36, 2] + list(range(6, 30)) + [1])  # 29: not a multiple of 8
    extract = FeatureExtractor(models.flax_apply_fn(model), parallel.make_mesh(), mean=MEAN,
                               std=STD, size=IMAGE, batch_size=12)
    assert extract.batch_size == 16  # rounded up to a multiple of the 8 devices
    got = np.asarray(extract(params, batch_stats, source, indices))
    x = (source.images[indices].astype(np.float32) / 255.0 - np.array(MEAN)) / np.array(STD)
    want = model.apply({"params": params, "batch_stats": batch_stats},
                       jnp.asarray(x, jnp.float32), train=False)["features"]
    assert got.shape == (29, want.shape[1])
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_padded_features_stay_split_over_the_devices():
    """padded=True: the same rows, zeros after them, each device holding only its share."""
    model, params, batch_stats, source = _setup()
    indices = np.arange(29)
    mesh = parallel.make_mesh()
    extract = FeatureExtractor(models.flax_apply_fn(model), mesh, mean=MEAN, std=STD,
                               size=IMAGE, batch_size=16)
    exact = np.asarray(extract(params, batch_stats, source, indices))
    padded = extract(params, batch_stats, source, indices, padded=True)
    assert padded.shape == (32, exact.shape[1])
    assert {s.data.shape[0] for s in padded.addressable_shards} == {4}  # 32 rows / 8 devices
    np.testing.assert_array_equal(np.asarray(padded)[:29], exact)
    np.testing.assert_array_equal(np.asarray(padded)[29:], 0.0)
    # Unpadded and divisible by the devices: split too.
    split = extract(params, batch_stats, source, np.arange(24))
    assert {s.data.shape[0] for s in split.addressable_shards} == {3}


def test_many_batches_are_written_in_place_across_device_boundaries():
    """9 batches of 16 on 8 devices: 18 rows each, so batches straddle devices; the in-place
    writer must give the same rows as one forward pass."""
    model, params, batch_stats, source = _setup()
    indices = np.arange(140) % 37
    extract = FeatureExtractor(models.flax_apply_fn(model), parallel.make_mesh(), mean=MEAN,
                               std=STD, size=IMAGE, batch_size=16)
    padded = extract(params, batch_stats, source, indices, padded=True)
    assert padded.shape[0] == 144
    assert {s.data.shape[0] for s in padded.addressable_shards} == {18}
    x = (source.images[indices].astype(np.float32) / 255.0 - np.array(MEAN)) / np.array(STD)
    want = model.apply({"params": params, "batch_stats": batch_stats},
                       jnp.asarray(x, jnp.float32), train=False)["features"]
    np.testing.assert_allclose(np.asarray(padded)[:140], np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(padded)[140:], 0.0)
    exact = extract(params, batch_stats, source, indices)
    np.testing.assert_array_equal(np.asarray(exact), np.asarray(padded)[:140])


def test_non_finite_features_are_an_error_not_a_silent_score():
    model, params, batch_stats, source = _setup()
    apply_fn = models.flax_apply_fn(model)

    def one_nan(params, batch_stats, images, *, train):
        # (NaN parameters would not do: XLA:CPU's ReLU may turn NaN into 0.)
        outputs, batch_stats = apply_fn(params, batch_stats, images, train=train)
        f = outputs["features"]
        return dict(outputs, features=f.at[3, 1].set(jnp.nan)), batch_stats

    extract = FeatureExtractor(one_nan, parallel.make_mesh(), mean=MEAN, std=STD, size=IMAGE)
    with pytest.raises(NonFiniteFeaturesError, match="xla_cpu_experimental_ynn_fusion_type"):
        extract(params, batch_stats, source, np.arange(8))


def test_eval_images_resize_the_shorter_side_and_centre_crop():
    # A 40 x 80 image with a vertical gradient: resized to shorter side 16 / 0.875 = 18, then
    # the central 16 x 16.
    h, w = 40, 80
    image = np.repeat(np.linspace(0, 255, h).astype(np.uint8)[:, None, None], w, 1).repeat(3, 2)
    source = sources.from_arrays(image[None])
    out = eval_images(source, [0], 16)
    assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8
    column = out[0, :, 8, 0].astype(float)
    full = np.linspace(0, 255, 18)
    np.testing.assert_allclose(column, full[1:17], atol=6)  # the middle rows of 18
    same = sources.from_arrays(np.zeros((2, 16, 16, 3), np.uint8) + 7)
    np.testing.assert_array_equal(eval_images(same, [1, 0], 16), same.images[[1, 0]])
