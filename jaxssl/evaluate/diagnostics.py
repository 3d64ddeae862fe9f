"""Collapse diagnostics of a representation: numbers that fall when an encoder collapses.

- `normalized_std`: the standard deviation over rows of each dimension of the L2-normalised
  embeddings, averaged over dimensions. About 1/sqrt(D) for embeddings spread over the sphere,
  0 when every row is the same vector (complete collapse).
- `rankme`: the effective rank of a feature matrix (RankMe, Garrido et al. 2023):
  exp(entropy of p), p_k = sigma_k / sum(sigma) + eps over its singular values. D for
  isotropic features, 1 for features on one line.
- `alignment` and `uniformity` (Wang & Isola 2020) for contrastive methods: the mean distance
  between the two views' normalised embeddings, ||n(z1) - n(z2)||^alpha, and
  log mean_{i != j} exp(-t ||n(z_i) - n(z_j)||^2) over pairs of rows.

Pure jax.numpy on one host's arrays, computed in float32 (float64 stays float64) with products at
Precision.HIGHEST; each takes [N, D] arrays and returns a scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxssl.losses import l2_normalize

__all__ = ["normalized_std", "rankme", "alignment", "uniformity", "RANKME_EPS", "feature_health",
           "collapse_message", "COLLAPSED_STD", "PARTIAL_RANK"]

RANKME_EPS = 1e-7  # the RankMe paper's epsilon
_HIGHEST = jax.lax.Precision.HIGHEST


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected embeddings [N, D] with N >= 1; got shape {x.shape}")
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def normalized_std(z: jax.Array) -> jax.Array:
    """Mean over dimensions of the (biased) standard deviation over rows of l2_normalize(z)."""
    return jnp.mean(jnp.std(l2_normalize(_float(z)), axis=0))


def rankme(z: jax.Array, eps: float = RANKME_EPS) -> jax.Array:
    """exp(-sum_k p_k log p_k), p_k = sigma_k / sum(sigma) + eps, sigma the singular values of
    z [N, D] (no centring, as in the paper)."""
    sigma = jnp.linalg.svd(_float(z), compute_uv=False)
    p = sigma / jnp.maximum(jnp.sum(sigma), jnp.finfo(sigma.dtype).tiny) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def alignment(z1: jax.Array, z2: jax.Array, alpha: float = 2.0) -> jax.Array:
    """mean_i ||n(z1_i) - n(z2_i)||^alpha, rows of z1 and z2 being two views of one image."""
    z1, z2 = _float(z1), _float(z2)
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs two views of one shape; got {z1.shape} and {z2.shape}")
    d = jnp.linalg.norm(l2_normalize(z1) - l2_normalize(z2), axis=1)
    return jnp.mean(d ** alpha)


def uniformity(z: jax.Array, t: float = 2.0) -> jax.Array:
    """log mean over pairs i != j of exp(-t ||n(z_i) - n(z_j)||^2); needs N >= 2."""
    z = l2_normalize(_float(z))
    n = z.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least 2 rows")
    # ||a - b||^2 = 2 - 2 a.b for unit rows; the diagonal is left out of the mean.
    sq = jnp.maximum(2.0 - 2.0 * jnp.matmul(z, z.T, precision=_HIGHEST), 0.0)
    off = ~jnp.eye(n, dtype=bool)
    # log-mean-exp over the off-diagonal entries, stable for large t.
    logits = jnp.where(off, -t * sq, -jnp.inf)
    return jax.nn.logsumexp(logits) - jnp.log(n * (n - 1.0))


def feature_health(z: jax.Array) -> dict[str, jax.Array]:
    """{"feature_std": normalized_std(z), "rankme": RankMe of z} for the kNN monitor.

    RankMe from the eigenvalues of the [D, D] Gram matrix z^T z (sigma_k^2), so that a sharded
    [N, D] array of any N costs one [D, D] product and no SVD of N rows. Eigenvalues below the
    Gram matrix's rounding are taken as 0; the other small singular values carry about
    sqrt(eps) of the largest each, so the result agrees with `rankme` (an SVD) within 0.5% for
    full-rank features (measured up to D = 2048) and within 0.01 for features of rank 1 or 2
    (tests). Jit it; z
    may be a global array split over devices.
    """
    z = _float(z)
    gram = jnp.matmul(z.T, z, precision=_HIGHEST)
    eig = jnp.linalg.eigvalsh(gram)
    # Eigenvalues within the Gram matrix's rounding (D eps of the largest) are zero: their
    # square roots, about sqrt(D eps) of the largest singular value each, would otherwise add
    # up to a rank that a collapsed representation does not have.
    noise = eig[-1] * z.shape[1] * jnp.finfo(eig.dtype).eps
    sigma = jnp.sqrt(jnp.where(eig > noise, eig, 0.0))
    p = sigma / jnp.maximum(jnp.sum(sigma), jnp.finfo(sigma.dtype).tiny) + RANKME_EPS
    return {"feature_std": normalized_std(z), "rankme": jnp.exp(-jnp.sum(p * jnp.log(p)))}


COLLAPSED_STD = 0.02  # feature_std * sqrt(D) below this: the features are (nearly) one vector
PARTIAL_RANK = 1 / 16  # RankMe / D below this: the features span few of their dimensions


def collapse_message(feature_std: float, rankme: float, dim: int) -> str | None:
    """One line when the representation has collapsed, completely or in part, else None.

    Collapsed: the normalised features' per-dimension std is under COLLAPSED_STD of the
    1/sqrt(D) of a spread representation (every image maps to about the same direction), or
    RankMe is under 1.5 (the features lie on about one line). Partly collapsed (a dimensional
    collapse, which a kNN score near chance does not tell apart from slow learning): RankMe under
    PARTIAL_RANK of D. A randomly initialised ResNet's features already span about a quarter of
    their dimensions (RankMe 30 of 128 for the demo model)."""
    spread = 1.0 / dim ** 0.5
    if feature_std < COLLAPSED_STD * spread or rankme < 1.5:
        return (f"the representation has collapsed: per-dimension std of the normalised "
                f"features {feature_std:.2g} (about {spread:.2g} when spread), effective rank "
                f"(RankMe) {rankme:.3g} of {dim}")
    if rankme < PARTIAL_RANK * dim:
        return (f"the representation has partly collapsed: its features span about {rankme:.3g} "
                f"of {dim} dimensions (effective rank, RankMe; under {PARTIAL_RANK * dim:.3g} is "
                f"a dimensional collapse), per-dimension std of the normalised features "
                f"{feature_std:.2g} (about {spread:.2g} when spread)")
    return None
