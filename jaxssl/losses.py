"""Contrastive losses: SimCLR's NT-Xent (InfoNCE), gathered across devices, and MoCo's InfoNCE
against a queue of negatives.

Everything here is pure JAX and imports no TensorFlow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["info_nce", "info_nce_with_accuracy", "contrastive_accuracy", "l2_normalize",
           "moco_info_nce", "moco_info_nce_with_accuracy"]

_NORM_EPS = 1e-12  # guards the division for an all-zero embedding


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Unit-length rows in float32. x: [N, D] any float dtype -> [N, D] float32."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def _check(z1: jax.Array, z2: jax.Array, temperature: float) -> None:
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(
            f"info_nce expects z1 and z2 of shape [batch, dim]; got {z1.shape} and {z2.shape}"
        )
    if z1.shape != z2.shape:
        raise ValueError(
            f"info_nce expects z1 and z2 of the same shape (two views of the same images); "
            f"got {z1.shape} and {z2.shape}"
        )
    if z1.shape[0] < 1:
        raise ValueError("info_nce needs at least one image per device; got an empty batch")
    # A traced temperature cannot be checked here; a Python number can and should be.
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (SimCLR uses 0.1-0.5); got {temperature}")


def _logits_and_labels(z1, z2, temperature, axis_name):
    """The local rows of the [2N, 2N] similarity matrix and the column of each row's positive.

    z1, z2: [b, D] (b = local batch). Returns logits [2b, 2N] float32 with the self-similarity
    set to -inf, and labels [2b] int32, where N = b * (number of devices on axis_name).
    """
    b = z1.shape[0]
    q1 = l2_normalize(z1)
    q2 = l2_normalize(z2)
    if axis_name is None:
        k1, k2 = q1, q2
        offset = 0
    else:
        # Every device contributes its b rows of each view; tiled gathering puts device d's rows
        # at [d*b, (d+1)*b) of k1 and k2. Gradients flow back through all_gather (its transpose
        # is a reduce-scatter), so each device's embeddings receive the gradient of every
        # device's rows in which they appear as negatives.
        k1 = jax.lax.all_gather(q1, axis_name, tiled=True)
        k2 = jax.lax.all_gather(q2, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * b
    n = k1.shape[0]
    # Columns: [all first views (N) ; all second views (N)]. Local rows: [our z1 (b) ; our z2 (b)].
    keys = jnp.concatenate([k1, k2], axis=0)  # [2N, D]
    queries = jnp.concatenate([q1, q2], axis=0)  # [2b, D]
    logits = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST) / temperature
    local = jnp.arange(b, dtype=jnp.int32) + offset  # global image index of each local row
    # Row i of z1 is image offset+i: its own column is offset+i (in the first-view block) and
    # its positive, the second view of the same image, is N+offset+i. Rows of z2 the reverse.
    # The offset is axis_index * b because tiled all_gather orders the rows by device.
    self_cols = jnp.concatenate([local, local + n])
    labels = jnp.concatenate([local + n, local])
    cols = jnp.arange(2 * n, dtype=jnp.int32)
    logits = jnp.where(cols[None, :] == self_cols[:, None], -jnp.inf, logits)
    return logits, labels


def _global_mean(x: jax.Array, axis_name) -> jax.Array:
    # Every device holds the same number of rows, so the mean of per-device means is the
    # mean over the global batch.
    x = jnp.mean(x)
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def info_nce_with_accuracy(
    z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """NT-Xent loss and contrastive top-1 accuracy over the 2N views of a batch.

    Args:
      z1, z2: [b, D] any float dtype; row i of z1 and row i of z2 are two views of one image.
        They are L2-normalised here, and similarities are computed in float32.
      temperature: > 0.
      axis_name: inside `shard_map`, the mesh axis the batch is split over; embeddings of all
        devices are gathered so every view is contrasted against the whole global batch.

    Returns:
      (loss, accuracy): float32 scalars, the means over the 2N views of the global batch, equal
      on every device. Accuracy is the fraction of views whose most similar other view is their
      positive.
    """
    _check(z1, z2, temperature)
    logits, labels = _logits_and_labels(z1, z2, temperature, axis_name)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _global_mean(nll, axis_name), jax.lax.stop_gradient(_global_mean(correct, axis_name))


def info_nce(
    z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None
) -> jax.Array:
    """NT-Xent (SimCLR) loss: scalar float32, the mean over the 2N views of the global batch.

    z1, z2: [b, D] any float dtype. See `info_nce_with_accuracy` for the arguments.
    """
    return info_nce_with_accuracy(z1, z2, temperature=temperature, axis_name=axis_name)[0]


def contrastive_accuracy(
    z1: jax.Array, z2: jax.Array, *, axis_name: str | None = None
) -> jax.Array:
    """Fraction of the 2N views whose nearest other view (cosine) is their positive.

    z1, z2: [b, D] any float dtype. Returns a float32 scalar equal on every device.
    """
    return info_nce_with_accuracy(z1, z2, temperature=1.0, axis_name=axis_name)[1]


def moco_info_nce_with_accuracy(
    q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MoCo's InfoNCE: each query's positive is its own key, its negatives the queue.

    Args:
      q: [b, D] queries (the trained encoder), any float dtype.
      k: [b, D] keys of the same images from the momentum encoder; no gradient flows into them.
      queue: [K, D] negatives (keys of earlier batches), no gradient.
      temperature: > 0 (MoCo v2: 0.2 on ImageNet, 0.1 on CIFAR).
      axis_name: inside shard_map, the data axis: the loss is then the global-batch mean.
    All are L2-normalised here; logits are float32 at full precision.

    Returns:
      (loss, accuracy) float32 scalars: the mean cross-entropy of [q.k, q.queue] / T with the
      positive at column 0, and the fraction of queries whose positive scores highest.
    """
    if q.ndim != 2 or q.shape != k.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"moco_info_nce expects q and k [batch, dim] and queue [K, dim]; got "
                         f"{q.shape}, {k.shape} and {queue.shape}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (MoCo uses 0.1-0.2); got {temperature}")
    q = l2_normalize(q)
    k = jax.lax.stop_gradient(l2_normalize(k))
    queue = jax.lax.stop_gradient(l2_normalize(queue))
    pos = jnp.sum(q * k, axis=-1, keepdims=True)  # [b, 1]
    neg = jnp.dot(q, queue.T, precision=jax.lax.Precision.HIGHEST)  # [b, K]
    logits = jnp.concatenate([pos, neg], axis=1) / temperature
    nll = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)
    return _global_mean(nll, axis_name), jax.lax.stop_gradient(_global_mean(correct, axis_name))


def moco_info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float,
                  axis_name: str | None = None) -> jax.Array:
    """MoCo's InfoNCE loss (scalar float32); see `moco_info_nce_with_accuracy`."""
    return moco_info_nce_with_accuracy(q, k, queue, temperature=temperature,
                                       axis_name=axis_name)[0]
