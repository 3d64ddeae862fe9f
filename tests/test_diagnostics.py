"""Collapse diagnostics (jaxssl.evaluate.diagnostics) against float64 numpy written here, and
the values they must take for healthy and collapsed embeddings."""

import itertools

import jax
import numpy as np
import pytest

from jaxssl.evaluate import diagnostics


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_std(z):
    return np.mean(np.std(_unit(z), axis=0))


def _ref_rankme(z, eps=1e-7):
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + eps
    return np.exp(-np.sum(p * np.log(p)))


def _ref_alignment(z1, z2, alpha):
    return np.mean(np.linalg.norm(_unit(z1) - _unit(z2), axis=1) ** alpha)


def _ref_uniformity(z, t):
    u = _unit(z)
    pairs = [np.exp(-t * np.sum((u[i] - u[j]) ** 2))
             for i, j in itertools.permutations(range(len(u)), 2)]
    return np.log(np.mean(pairs))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(40, 12)) @ np.diag(np.linspace(0.2, 3.0, 12)) + 0.3
    return z1, z1 + 0.4 * rng.normal(size=z1.shape)


def test_float64_values_equal_numpy(data):
    z1, z2 = data
    with jax.enable_x64(True):
        np.testing.assert_allclose(diagnostics.normalized_std(z1), _ref_std(z1), rtol=1e-12)
        np.testing.assert_allclose(diagnostics.rankme(z1), _ref_rankme(z1), rtol=1e-12)
        for alpha in (1.0, 2.0):
            np.testing.assert_allclose(diagnostics.alignment(z1, z2, alpha),
                                       _ref_alignment(z1, z2, alpha), rtol=1e-12)
        for t in (0.5, 2.0):
            np.testing.assert_allclose(diagnostics.uniformity(z1, t), _ref_uniformity(z1, t),
                                       rtol=1e-12)


def test_float32_inputs_are_close_to_float64(data):
    z1, z2 = (x.astype(np.float32) for x in data)
    assert diagnostics.rankme(z1).dtype == np.float32
    np.testing.assert_allclose(diagnostics.normalized_std(z1), _ref_std(data[0]), rtol=1e-5)
    np.testing.assert_allclose(diagnostics.rankme(z1), _ref_rankme(data[0]), rtol=1e-4)
    np.testing.assert_allclose(diagnostics.alignment(z1, z2), _ref_alignment(*data, 2.0),
                               rtol=1e-5)
    np.testing.assert_allclose(diagnostics.uniformity(z1), _ref_uniformity(data[0], 2.0),
                               rtol=1e-5)


def test_healthy_and_collapsed_embeddings():
    d = 16
    iso = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 64)))[0][:, :d] * 8.0
    collapsed = np.tile(np.arange(1.0, d + 1), (64, 1))
    one_line = np.outer(np.linspace(1.0, 2.0, 64), np.ones(d))
    with jax.enable_x64(True):
        # Orthonormal columns: every singular value equal, effective rank D.
        np.testing.assert_allclose(diagnostics.rankme(iso), d, rtol=1e-5)
        assert float(diagnostics.rankme(one_line)) == pytest.approx(1.0, abs=1e-4)
        assert float(diagnostics.normalized_std(collapsed)) == pytest.approx(0.0, abs=1e-12)
        # ±e_k rows, evenly spread: each coordinate is ±1 on 2 of the 2D rows, 0 elsewhere,
        # so its std is 1/sqrt(D), the healthy level.
        spread = np.concatenate([np.eye(d), -np.eye(d)])
        np.testing.assert_allclose(diagnostics.normalized_std(spread), 1 / np.sqrt(d), rtol=1e-12)
        assert float(diagnostics.alignment(spread, spread)) == 0.0
        # Collapsed rows: every pair at distance 0, so uniformity is log(1) = 0, its maximum;
        # spread rows are more uniform (negative).
        assert float(diagnostics.uniformity(collapsed)) == pytest.approx(0.0, abs=1e-12)
        assert float(diagnostics.uniformity(spread)) < -1.0


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"expected embeddings \[N, D\]"):
        diagnostics.rankme(np.zeros(5))
    with pytest.raises(ValueError, match="two views of one shape"):
        diagnostics.alignment(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        diagnostics.uniformity(np.ones((1, 3)))
