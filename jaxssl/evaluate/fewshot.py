"""Few-shot linear probes: closed-form ridge regression on frozen features (big_vision's style).

K labelled train images per class are drawn (seeded); a ridge regression from their
L2-normalised, centred features to +-1 one-hot targets is solved in closed form for every
regulariser of a grid at once (one eigendecomposition); the regulariser is chosen on held-out
train images of the same draw (never the eval split), and the eval split is scored with it.
Host numpy in float64: a draw of 25 shots x 1000 classes on 2048-d features is one 2048 x 2048
eigendecomposition, seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxssl.evaluate.topk import topk_correct

__all__ = ["LAMBDAS", "draw", "ridge", "probe"]

# The regularisers tried, on features of unit norm (centred): 2^-10 ... 2^10.
LAMBDAS = tuple(2.0 ** k for k in range(-10, 11))


def draw(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """[num_classes, per_class] distinct indices of `labels`, row c all of class c, in a seeded
    random order (the first K of each row are a K-shot set, the rest can be held out).
    ValueError naming the class when one has fewer than per_class examples."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < per_class:
        c = int(np.argmin(counts))
        raise ValueError(f"class {c} has {counts[c]} train examples; the few-shot probe draws "
                         f"{per_class} of each class (its shots and the held-out images that "
                         f"choose the regulariser); lower eval.fewshot_shots or "
                         f"eval.fewshot_val_per_class")
    order = np.argsort(labels, kind="stable")  # one pass, not one per class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(order[s:s + n], per_class, replace=False)
                     for s, n in zip(starts, counts)])


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge(x: np.ndarray, labels: np.ndarray, num_classes: int,
          lambdas: Sequence[float] = LAMBDAS):
    """Ridge regressions of L2-normalised features x [n, d] onto 2 * one_hot(labels) - 1, one
    per regulariser: argmin_W |(X - mean) W - (T - tmean)|^2 + lam |W|^2 (the bias is the
    centring). Returns predict(z, i) -> scores [m, C] of the i-th regulariser."""
    x = _normalize(x)
    mean = x.mean(0)
    xc = x - mean
    t = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    tmean = t.mean(0)
    tc = t - tmean
    n, d = xc.shape
    if n <= d:  # dual: W = Xc^T (Xc Xc^T + lam I)^-1 Tc, an n x n problem
        s, u = np.linalg.eigh(xc @ xc.T)
        ut = u.T @ tc
        weights = [xc.T @ (u @ (ut / (s + lam)[:, None])) for lam in lambdas]
    else:  # primal: W = (Xc^T Xc + lam I)^-1 Xc^T Tc, a d x d problem
        s, u = np.linalg.eigh(xc.T @ xc)
        b = u.T @ (xc.T @ tc)
        weights = [u @ (b / (s + lam)[:, None]) for lam in lambdas]

    def predict(z: np.ndarray, i: int) -> np.ndarray:
        return (_normalize(z) - mean) @ weights[i] + tmean

    return predict


def probe(train_x, train_labels, val_x, val_labels, test_x, test_labels, num_classes: int,
          lambdas: Sequence[float] = LAMBDAS) -> dict:
    """Fit on (train_x, train_labels) for every regulariser, choose the one with the best top-1
    on (val_x, val_labels) (ties: the larger regulariser), score the test set with it.
    {"top1", "top5" (test), "lambda", "val_top1"}."""
    predict = ridge(train_x, train_labels, num_classes, lambdas)
    val = [float(np.mean(predict(val_x, i).argmax(1) == val_labels)) for i in range(len(lambdas))]
    best = max(range(len(lambdas)), key=lambda i: (val[i], lambdas[i]))
    scores = predict(test_x, best)
    return {"top1": float(np.mean(scores.argmax(1) == test_labels)),
            "top5": float(np.mean(topk_correct(scores, test_labels, 5))),
            "lambda": float(lambdas[best]), "val_top1": val[best]}
