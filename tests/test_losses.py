import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import losses
from reference import nt_xent, numerical_grad


@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.5), (4, 8, 0.1), (16, 32, 0.2), (33, 128, 1.0)])
def test_info_nce_matches_float64_numpy(n, d, temperature):
    rng = np.random.default_rng(n * 100 + d)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = rng.normal(size=(n, d)).astype(np.float32)
    loss, acc = losses.info_nce_with_accuracy(z1, z2, temperature=temperature)
    ref_loss, ref_acc = nt_xent(z1, z2, temperature)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc, rtol=0, atol=0)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(losses.info_nce(z1, z2, temperature=temperature), ref_loss, rtol=1e-5)


def test_hand_computed_case():
    # Two images, orthogonal 2-d embeddings: view pairs identical, images orthogonal.
    z1 = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
    z2 = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    t = 0.5
    # Each view: positive similarity 1/t = 2, its two negatives 0: loss = -log(e^2 / (e^2 + 2)).
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 2.0))
    np.testing.assert_allclose(losses.info_nce(z1, z2, temperature=t), expected, rtol=1e-6)
    assert float(losses.contrastive_accuracy(z1, z2)) == 1.0


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    n, d, t = 5, 6, 0.3
    z = rng.normal(size=(2, n, d))
    grad = jax.grad(lambda z: losses.info_nce(z[0], z[1], temperature=t))(jnp.asarray(z, jnp.float32))
    ref = numerical_grad(lambda z: nt_xent(z[0], z[1], t)[0], z)
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_bfloat16_inputs_give_float32_logits():
    rng = np.random.default_rng(1)
    z1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
    z2 = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
    loss = losses.info_nce(z1, z2, temperature=0.1)
    assert loss.dtype == jnp.float32
    # Same as the float64 reference on the bfloat16-rounded values: nothing else is rounded.
    ref, _ = nt_xent(np.asarray(z1, np.float64), np.asarray(z2, np.float64), 0.1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_normalisation_is_inside():
    rng = np.random.default_rng(2)
    z1 = rng.normal(size=(6, 4)).astype(np.float32)
    z2 = rng.normal(size=(6, 4)).astype(np.float32)
    a = losses.info_nce(z1, z2, temperature=0.2)
    b = losses.info_nce(7.0 * z1, 0.01 * z2, temperature=0.2)
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize(
    "shape1,shape2,match",
    [((4, 8), (5, 8), "same shape"), ((4, 8), (4, 7), "same shape"), ((4,), (4,), r"\[batch, dim\]")],
)
def test_bad_shapes_raise(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        losses.info_nce(jnp.ones(shape1), jnp.ones(shape2), temperature=0.1)


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_bad_temperature_raises(t):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.info_nce(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=t)
