"""Few-shot ridge probes (`jaxssl.evaluate.fewshot`) against a float64 numpy reference
(`jaxssl eval fewshot` on a trained workdir is in test_evaluation, with the other kinds)."""

import numpy as np
import pytest

from jaxssl.evaluate import fewshot


def _reference(x, labels, z, num_classes, lam):
    """Ridge by the textbook normal equations, nothing shared with the module."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    t = np.where(np.arange(num_classes)[None] == labels[:, None], 1.0, -1.0)
    xa = np.concatenate([x - x.mean(0), np.ones((len(x), 1))], axis=1)
    # The bias (last row) is not regularised: lam on the weights only.
    reg = lam * np.eye(xa.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(xa.T @ xa + reg, xa.T @ t)
    za = np.concatenate([z - x.mean(0), np.ones((len(z), 1))], axis=1)
    return za @ w


@pytest.mark.parametrize("n,d", [(12, 40), (60, 8)])  # the dual (n <= d) and the primal
def test_ridge_equals_the_normal_equations(n, d):
    rng = np.random.default_rng(n)
    # float32 features in (as the extractor gives), float64 inside.
    x = rng.normal(size=(n, d)).astype(np.float32).astype(np.float64)
    z = rng.normal(size=(7, d))
    labels = rng.integers(0, 4, n)
    lambdas = (0.01, 1.0, 30.0)
    predict = fewshot.ridge(x.astype(np.float32), labels, 4, lambdas)
    for i, lam in enumerate(lambdas):
        np.testing.assert_allclose(predict(z, i), _reference(x, labels, z, 4, lam),
                                   rtol=1e-6, atol=1e-9)


def test_the_regulariser_is_chosen_on_the_held_out_images():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))

    def sample(k):
        y = np.repeat(np.arange(3), k)
        return centres[y] + 1.5 * rng.normal(size=(len(y), 16)), y

    (x, y), (xv, yv), (xt, yt) = sample(5), sample(20), sample(30)
    got = fewshot.probe(x, y, xv, yv, xt, yt, 3)
    val = [np.mean(_reference(x, y, xv, 3, lam).argmax(1) == yv) for lam in fewshot.LAMBDAS]
    best = max(range(len(val)), key=lambda i: (val[i], fewshot.LAMBDAS[i]))
    assert got["lambda"] == fewshot.LAMBDAS[best] and got["val_top1"] == pytest.approx(val[best])
    scores = _reference(x, y, xt, 3, fewshot.LAMBDAS[best])
    assert got["top1"] == pytest.approx(np.mean(scores.argmax(1) == yt))
    assert got["top1"] <= got["top5"] == 1.0  # 3 classes: top-5 holds every class


def test_draws_are_per_class_disjoint_and_seeded():
    labels = np.repeat(np.arange(4), [6, 9, 7, 30])
    plan = fewshot.draw(labels, 6, 4, seed=1)
    assert plan.shape == (4, 6) and len(np.unique(plan)) == 24
    assert (labels[plan] == np.arange(4)[:, None]).all()
    np.testing.assert_array_equal(plan, fewshot.draw(labels, 6, 4, seed=1))
    assert not np.array_equal(plan, fewshot.draw(labels, 6, 4, seed=2))
    with pytest.raises(ValueError, match="class 0 has 6 train examples; the few-shot probe "
                                         "draws 7 of each class"):
        fewshot.draw(labels, 7, 4, seed=1)
