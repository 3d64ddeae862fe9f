"""Contrastive losses: SimCLR's NT-Xent (InfoNCE), gathered across devices, its memory-bounded
blockwise form for very large batches, and MoCo's InfoNCE against a queue of negatives.

Everything here is pure JAX and imports no TensorFlow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["info_nce", "info_nce_with_accuracy", "contrastive_accuracy", "l2_normalize",
           "moco_info_nce", "moco_info_nce_with_accuracy", "info_nce_blockwise",
           "info_nce_blockwise_with_accuracy", "DEFAULT_BLOCK_SIZE"]

_NORM_EPS = 1e-12  # guards the division for an all-zero embedding


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Unit-length rows in float32 (float64 stays float64: tests check sharded steps against the
    single-device one in float64, where rounding cannot hide a wrong sum). x: [N, D] any float
    dtype -> [N, D] float32, or float64 for float64 input."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
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


def _views_and_keys(z1, z2, axis_name):
    """Normalised local views and the keys every local row is contrasted with.

    z1, z2: [b, D] (b = local batch). Returns q1, q2 [b, D] float32; keys [2N, D] float32 (all
    first views, then all second views, N = b * devices on axis_name); self_cols and labels
    [2b] int32: for each local row [our z1 ; our z2], its own column and its positive's.
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
    keys = jnp.concatenate([k1, k2], axis=0)  # [2N, D]
    local = jnp.arange(b, dtype=jnp.int32) + offset  # global image index of each local row
    # Row i of z1 is image offset+i: its own column is offset+i (in the first-view block) and
    # its positive, the second view of the same image, is N+offset+i. Rows of z2 the reverse.
    # The offset is axis_index * b because tiled all_gather orders the rows by device.
    self_cols = jnp.concatenate([local, local + n])
    labels = jnp.concatenate([local + n, local])
    return q1, q2, keys, self_cols, labels


def _logits_and_labels(z1, z2, temperature, axis_name):
    """The local rows of the [2N, 2N] similarity matrix and the column of each row's positive.

    z1, z2: [b, D] (b = local batch). Returns logits [2b, 2N] float32 with the self-similarity
    set to -inf, and labels [2b] int32, where N = b * (number of devices on axis_name).
    """
    q1, q2, keys, self_cols, labels = _views_and_keys(z1, z2, axis_name)
    queries = jnp.concatenate([q1, q2], axis=0)  # [2b, D]
    logits = jnp.dot(queries, keys.T, precision=jax.lax.Precision.HIGHEST) / temperature
    cols = jnp.arange(keys.shape[0], dtype=jnp.int32)
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


# ---------------------------------------------------------------------------------------------
# Memory-bounded InfoNCE: the same loss as info_nce without the [2N, 2N] logits.

_HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT_BLOCK_SIZE = 4096  # 4096 x 4096 float32 logits: 64 MiB per block


def _tiles(n: int, block: int) -> tuple[int, int]:
    """(tile length, number of tiles) covering n rows with tiles of at most `block` rows."""
    size = min(block, n)
    return size, -(-n // size)


def _pad_to(x: jax.Array, length: int, value=0) -> jax.Array:
    return jnp.pad(x, [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1),
                   constant_values=value)


def _tile_logits(q, k, self_cols, col0, n_cols):
    """Logits [rows, cols] float32 of one tile: q [rows, D] (already / T) against k [cols, D],
    whose first column is global column col0; -inf at each row's own column and at the padding
    past n_cols, so neither counts in the log-sum-exp nor wins the argmax."""
    s = jnp.dot(q, k.T, precision=_HIGHEST)
    cols = col0 + jnp.arange(k.shape[0], dtype=jnp.int32)
    masked = (cols[None, :] == self_cols[:, None]) | (cols[None, :] >= n_cols)
    return jnp.where(masked, -jnp.inf, s)


def _tiled(q, k, self_cols, block):
    """q, self_cols padded and split into row tiles, k into column tiles (_lse_and_first_max)."""
    (rb, nr), (cb, nc) = _tiles(q.shape[0], block), _tiles(k.shape[0], block)
    qt = _pad_to(q, rb * nr).reshape(nr, rb, -1)
    st = _pad_to(self_cols, rb * nr, -1).reshape(nr, rb)
    kt = _pad_to(k, cb * nc).reshape(nc, cb, -1)
    return qt, st, kt, jnp.arange(nc, dtype=jnp.int32) * cb


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lse_and_first_max(q, k, self_cols, block):
    """Per row, log-sum-exp of q @ k.T over every column but its own, and the first column
    holding the row's maximum (jnp.argmax's tie-break), one block x block tile at a time.

    q: [R, D] float32 queries already divided by the temperature; k: [C, D] float32 keys;
    self_cols: [R] int32, the column each row must not see (itself). Returns (lse [R] float32,
    first_max [R] int32). Peak memory O(block^2 + (R + C) D), never R x C.
    """
    return _lse_and_first_max_fwd(q, k, self_cols, block)[0]


def _lse_and_first_max_fwd(q, k, self_cols, block):
    n_rows, n_cols = q.shape[0], k.shape[0]
    qt, st, kt, col0 = _tiled(q, k, self_cols, block)

    def row_tile(args):
        qr, sr = args

        def column_tile(carry, xs):
            m, l, arg = carry
            kc, c0 = xs
            s = _tile_logits(qr, kc, sr, c0, n_cols)
            tile_max = jnp.max(s, axis=1)
            new_m = jnp.maximum(m, tile_max)
            # A row may have seen only masked columns so far (m = -inf): rescale by 0, not NaN.
            ref = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
            l = l * jnp.exp(m - ref) + jnp.sum(jnp.exp(s - ref[:, None]), axis=1)
            # Strictly greater: on a tie the earlier tile, hence the first column, wins.
            arg = jnp.where(tile_max > m, c0 + jnp.argmax(s, axis=1).astype(jnp.int32), arg)
            return (new_m, l, arg), None

        # Carries built with *_like of the inputs keep their shard_map (varying) type.
        init = (jnp.full_like(qr[:, 0], -jnp.inf), jnp.zeros_like(qr[:, 0]), jnp.zeros_like(sr))
        (m, l, arg), _ = jax.lax.scan(column_tile, init, (kt, col0))
        return m + jnp.log(l), arg

    lse, arg = jax.lax.map(row_tile, (qt, st))
    lse, arg = lse.reshape(-1)[:n_rows], arg.reshape(-1)[:n_rows]
    return (lse, arg), (q, k, self_cols, lse)


def _lse_and_first_max_bwd(block, residuals, cotangents):
    # d lse_r / d s_rc = softmax_rc, recomputed tile by tile from the saved lse, so the backward
    # pass holds no R x C array either. (The -1 at the positive is autodiff's, outside: see
    # info_nce_blockwise_with_accuracy.)
    q, k, self_cols, lse = residuals
    g = cotangents[0]  # the first-max output is an integer: no cotangent
    n_rows, n_cols = q.shape[0], k.shape[0]
    qt, st, kt, col0 = _tiled(q, k, self_cols, block)
    rows = qt.shape[0] * qt.shape[1]
    # Padded rows have zero queries (logits 0) and g = 0: they add exactly nothing.
    gt = _pad_to(g, rows).reshape(qt.shape[:2])
    lt = _pad_to(lse, rows).reshape(qt.shape[:2])

    def row_tile(dk, xs):
        qr, sr, gr, lr = xs

        def column_tile(dq, xs):
            kc, c0 = xs
            w = gr[:, None] * jnp.exp(_tile_logits(qr, kc, sr, c0, n_cols) - lr[:, None])
            return (dq + jnp.dot(w, kc, precision=_HIGHEST),
                    jnp.dot(w.T, qr, precision=_HIGHEST))

        dq, dk_tiles = jax.lax.scan(column_tile, jnp.zeros_like(qr), (kt, col0))
        return dk + dk_tiles, dq

    dk, dq = jax.lax.scan(row_tile, jnp.zeros_like(kt), (qt, st, gt, lt))
    return (dq.reshape(rows, -1)[:n_rows], dk.reshape(-1, k.shape[1])[:n_cols], None)


_lse_and_first_max.defvjp(_lse_and_first_max_fwd, _lse_and_first_max_bwd)


def info_nce_blockwise_with_accuracy(
    z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """`info_nce_with_accuracy` without ever holding the [2b, 2N] logits.

    The logits are computed block_size x block_size at a time (rows: the 2b local views,
    columns: the 2N gathered ones), with a running float32 log-sum-exp; the backward pass
    recomputes each tile from the saved log-sum-exp. Peak memory is O(block_size^2 + N D)
    instead of O(b N); the price is computing the logits twice (forward, backward).

    Args:
      z1, z2, temperature, axis_name: as for `info_nce_with_accuracy` (z1, z2: [b, D] any
        float dtype).
      block_size: >= 1, the side of a tile of logits. It need not divide 2b or 2N (the last
        tile is padded and masked); one at least 2N computes the whole matrix in one tile.

    Returns:
      (loss, accuracy) float32 scalars equal to `info_nce_with_accuracy`'s up to float
      rounding; accuracy breaks ties as jnp.argmax does (the first maximal column wins).
    """
    _check(z1, z2, temperature)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 (e.g. {DEFAULT_BLOCK_SIZE}); got "
                         f"{block_size!r}")
    b = z1.shape[0]
    # The keys' gradient returns through all_gather (a reduce-scatter), outside the custom_vjp,
    # which sees only local arrays.
    q1, q2, keys, self_cols, labels = _views_and_keys(z1, z2, axis_name)
    # 1/T goes into the queries, so a traced temperature gets its gradient by autodiff.
    queries = jnp.concatenate([q1, q2], axis=0) / temperature  # [2b, D]
    lse, first_max = _lse_and_first_max(queries, keys, self_cols, block_size)
    # The positive of a local view is the other view of the same image, also local: its logit
    # is a row-wise dot here, and its gradient (the -1 of softmax - onehot) comes by autodiff.
    pos = jnp.concatenate([jnp.sum(queries[:b] * q2, axis=-1),
                           jnp.sum(queries[b:] * q1, axis=-1)])
    correct = (first_max == labels).astype(jnp.float32)
    return (_global_mean(lse - pos, axis_name),
            jax.lax.stop_gradient(_global_mean(correct, axis_name)))


def info_nce_blockwise(
    z1: jax.Array, z2: jax.Array, *, temperature: float, axis_name: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """`info_nce` in O(block_size^2) memory: scalar float32. z1, z2: [b, D] any float dtype;
    see `info_nce_blockwise_with_accuracy`."""
    return info_nce_blockwise_with_accuracy(z1, z2, temperature=temperature,
                                            axis_name=axis_name, block_size=block_size)[0]
