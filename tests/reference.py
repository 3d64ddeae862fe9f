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
