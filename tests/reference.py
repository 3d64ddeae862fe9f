"""Independent float64 numpy references used by the tests."""

import numpy as np


def nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent in float64: (loss, top-1 accuracy) over the 2N views."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    np.fill_diagonal(sim, -np.inf)
    positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    top = sim.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(sim - top).sum(axis=1))
    loss = np.mean(lse - sim[np.arange(2 * n), positive])
    accuracy = np.mean(sim.argmax(axis=1) == positive)
    return loss, accuracy


def numerical_grad(f, x, eps=1e-6):
    """Central finite differences of scalar f at float64 array x."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        hi = f(x)
        x[i] = old - eps
        lo = f(x)
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


def _unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def byol(p, z):
    """BYOL's regression loss in float64: mean over rows of 2 - 2 cos(p_i, z_i)."""
    return np.mean(2.0 - 2.0 * np.sum(_unit_rows(p) * _unit_rows(z), axis=1))


def simsiam(p, z):
    """SimSiam's D(p, z) in float64: mean over rows of -cos(p_i, z_i)."""
    return -np.mean(np.sum(_unit_rows(p) * _unit_rows(z), axis=1))


def barlow_twins(z1, z2, lambd):
    """Barlow Twins in float64: BatchNorm without affine (biased variance, eps 1e-5), the
    cross-correlation over the batch, (1 - diagonal)^2 plus lambd times the off-diagonal^2."""
    def bn(z):
        z = np.asarray(z, np.float64)
        return (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + 1e-5)

    c = bn(z1).T @ bn(z2) / len(z1)
    off = c - np.diag(np.diag(c))
    return np.sum((1.0 - np.diag(c)) ** 2) + lambd * np.sum(off ** 2)


def vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg in float64, as its official code computes it: (loss, (invariance, variance,
    covariance))."""
    z1, z2 = np.asarray(z1, np.float64), np.asarray(z2, np.float64)
    n, d = z1.shape
    invariance = np.mean((z1 - z2) ** 2)

    def std_and_cov(z):
        z = z - z.mean(axis=0)
        std = np.sqrt(z.var(axis=0, ddof=1) + 1e-4)
        cov = z.T @ z / (n - 1)
        off = cov - np.diag(np.diag(cov))
        return np.mean(np.maximum(0.0, 1.0 - std)), np.sum(off ** 2) / d

    (s1, c1), (s2, c2) = std_and_cov(z1), std_and_cov(z2)
    terms = (invariance, s1 / 2 + s2 / 2, c1 + c2)
    return sim_coeff * terms[0] + std_coeff * terms[1] + cov_coeff * terms[2], terms


def mocov3(q1, q2, k1, k2, temperature):
    """MoCo v3's symmetric loss in float64, as the paper's pseudocode: (loss, top-1 accuracy
    over the 2N queries)."""
    def ctr(q, k):
        logits = _unit_rows(q) @ _unit_rows(k).T / temperature
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        rows = np.arange(len(q))
        return (2 * temperature * np.mean(lse - logits[rows, rows]),
                np.mean(logits.argmax(axis=1) == rows))

    (l1, a1), (l2, a2) = ctr(q1, k2), ctr(q2, k1)
    return l1 + l2, (a1 + a2) / 2
