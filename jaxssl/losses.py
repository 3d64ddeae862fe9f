"""Self-supervised losses: SimCLR's NT-Xent (InfoNCE), gathered across devices, its
memory-bounded blockwise form for very large batches, MoCo's InfoNCE against a queue of
negatives, MoCo v3's symmetric InfoNCE against the momentum keys of the global batch, and the
non-contrastive losses of BYOL, SimSiam, Barlow Twins and VICReg.

With `axis_name` (inside shard_map, every device holding its rows of the batch) each statistic
over the batch (means, variances, cross-correlations, negatives) is taken over the global
batch, so the sharded loss and its gradients are the single-device ones on the whole batch.
Products are computed in float32 (float64 for float64 input) at Precision.HIGHEST, whatever the
input dtype, so GPUs and TPUs do not round them to bfloat16 or TF32.

Everything here is pure JAX and imports no TensorFlow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["info_nce", "info_nce_with_accuracy", "contrastive_accuracy", "l2_normalize",
           "moco_info_nce", "moco_info_nce_with_accuracy", "info_nce_blockwise",
           "info_nce_blockwise_with_accuracy", "DEFAULT_BLOCK_SIZE", "mocov3_loss",
           "mocov3_loss_with_accuracy", "byol_loss", "simsiam_loss", "barlow_twins_loss",
           "vicreg_loss", "vicreg_loss_with_terms"]

_NORM_EPS = 1e-12  # guards the division for an all-zero embedding
_HIGHEST = jax.lax.Precision.HIGHEST  # no bfloat16/TF32 rounding of products on GPU or TPU


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


def _check_same_shape(name: str, *arrays: jax.Array) -> None:
    """ValueError unless the arrays are [batch, dim] of one shape with at least one row."""
    shapes = [a.shape for a in arrays]
    if any(len(s) != 2 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"{name} expects {len(arrays)} arrays of one shape [batch, dim]; got "
                         f"{', '.join(map(str, shapes))}")
    if shapes[0][0] < 1:
        raise ValueError(f"{name} needs at least one row per device; got an empty batch")


def _global_rows(x, axis_name):
    """Every device's rows of x, and the global row index of each local row.

    x: [b, D]. Returns ([N, D], N = b * devices on axis_name, device d's rows at [d*b, (d+1)*b);
    [b] int32). Without axis_name: x itself and 0..b-1.
    """
    local = jnp.arange(x.shape[0], dtype=jnp.int32)
    if axis_name is None:
        return x, local
    # Tiled all_gather orders the rows by device, so local row i of device d is global row
    # d*b + i. Gradients flow back through all_gather (its transpose is a reduce-scatter), so
    # each device's rows receive the gradient of every device's rows they appear in.
    return (jax.lax.all_gather(x, axis_name, tiled=True),
            local + jax.lax.axis_index(axis_name) * x.shape[0])


def _views_and_keys(z1, z2, axis_name):
    """Normalised local views and the keys every local row is contrasted with.

    z1, z2: [b, D] (b = local batch). Returns q1, q2 [b, D] float32; keys [2N, D] float32 (all
    first views, then all second views, N = b * devices on axis_name); self_cols and labels
    [2b] int32: for each local row [our z1 ; our z2], its own column and its positive's.
    """
    q1 = l2_normalize(z1)
    q2 = l2_normalize(z2)
    k1, local = _global_rows(q1, axis_name)  # local: the global image index of each local row
    k2, _ = _global_rows(q2, axis_name)
    n = k1.shape[0]
    keys = jnp.concatenate([k1, k2], axis=0)  # [2N, D]
    # Row i of z1 is image local[i]: its own column is local[i] (in the first-view block) and
    # its positive, the second view of the same image, is N + local[i]. Rows of z2 the reverse.
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


def mocov3_loss_with_accuracy(
    q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, *, temperature: float = 0.2,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """MoCo v3's symmetric InfoNCE: queries against the momentum keys of the global batch.

    ctr(q, k): each query row against all N keys of the global batch (no queue), the positive
    being the key of the same image; the mean cross-entropy over the global batch times 2T (as
    in the MoCo v3 paper's pseudocode). The loss is ctr(q1, k2) + ctr(q2, k1).

    Args:
      q1, q2: [b, D] queries of the two views (the trained encoder and its predictor), any float
        dtype.
      k1, k2: [b, D] keys of the same views from the momentum encoder; no gradient flows into
        them.
      temperature: > 0 (the MoCo v3 paper: 0.2).
      axis_name: inside shard_map, the data axis: the keys of every device are gathered.
    All are L2-normalised here; logits are float32 at full precision.

    Returns:
      (loss, accuracy) float32 scalars equal on every device; accuracy is the fraction of the
      2N queries whose own key scores highest.
    """
    _check_same_shape("mocov3_loss", q1, q2, k1, k2)
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (MoCo v3 uses 0.2); got {temperature}")

    def ctr(q, k):
        keys, labels = _global_rows(jax.lax.stop_gradient(l2_normalize(k)), axis_name)
        logits = jnp.dot(l2_normalize(q), keys.T, precision=_HIGHEST) / temperature  # [b, N]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None],
                                   axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return _global_mean(nll, axis_name), _global_mean(correct, axis_name)

    loss1, acc1 = ctr(q1, k2)
    loss2, acc2 = ctr(q2, k1)
    return (2.0 * temperature * (loss1 + loss2),
            jax.lax.stop_gradient((acc1 + acc2) / 2.0))


def mocov3_loss(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array, *,
                temperature: float = 0.2, axis_name: str | None = None) -> jax.Array:
    """MoCo v3's loss (scalar float32); see `mocov3_loss_with_accuracy`."""
    return mocov3_loss_with_accuracy(q1, q2, k1, k2, temperature=temperature,
                                     axis_name=axis_name)[0]


# ---------------------------------------------------------------------------------------------
# Memory-bounded InfoNCE: the same loss as info_nce without the [2N, 2N] logits.

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


# ---------------------------------------------------------------------------------------------
# Non-contrastive losses: BYOL, SimSiam (a prediction against a target without gradient),
# Barlow Twins and VICReg (statistics of each dimension over the global batch).

_BARLOW_EPS = 1e-5  # BatchNorm1d's: the standardisation before the cross-correlation
_VICREG_EPS = 1e-4  # VICReg's official code: std = sqrt(var + 1e-4)


def _as_float(x: jax.Array) -> jax.Array:
    """x in float32 (float64 stays float64, as in l2_normalize)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _global_sum(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_batch(b: int, axis_name) -> int:
    return b if axis_name is None else b * jax.lax.axis_size(axis_name)


def _centred(z: jax.Array, axis_name) -> jax.Array:
    """z [b, D] as float minus each dimension's mean over the global batch."""
    z = _as_float(z)
    mean = jnp.mean(z, axis=0)
    # Every device holds the same number of rows: the mean of the means is the global mean.
    return z - (mean if axis_name is None else jax.lax.pmean(mean, axis_name))


def _cross(a: jax.Array, b: jax.Array, axis_name) -> jax.Array:
    """a^T b [D, D] summed over the rows of every device: one all-reduce of D^2 floats (as
    Barlow Twins' official code does), rather than gathering the [N, D] rows and repeating
    the N D^2 product on every device."""
    return _global_sum(jnp.dot(a.T, b, precision=_HIGHEST), axis_name)


def _off_diagonal(c: jax.Array) -> jax.Array:
    """c [D, D] with zeros on the diagonal. Masked rather than sum(c^2) - sum(diag^2), which
    would lose the small off-diagonal sum to the rounding of the diagonal's."""
    return jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c)


def _cosine_to_target(p: jax.Array, z: jax.Array) -> jax.Array:
    """Row-wise cosine similarity [b] float32 of p and z, with no gradient into z."""
    return jnp.sum(l2_normalize(p) * jax.lax.stop_gradient(l2_normalize(z)), axis=-1)


def byol_loss(p: jax.Array, z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
    """BYOL's regression loss: the mean over the global batch of 2 - 2 cos(p_i, z_i).

    p: [b, D] predictions of the online network, z: [b, D] targets (the momentum network's
    projections of the other view), any float dtype; no gradient flows into z. One direction:
    BYOL's loss is byol_loss(p1, z2) + byol_loss(p2, z1). Returns a float32 scalar, equal on
    every device.
    """
    _check_same_shape("byol_loss", p, z)
    return _global_mean(2.0 - 2.0 * _cosine_to_target(p, z), axis_name)


def simsiam_loss(p: jax.Array, z: jax.Array, *, axis_name: str | None = None) -> jax.Array:
    """SimSiam's D(p, stopgrad(z)): the mean over the global batch of -cos(p_i, z_i).

    p: [b, D] predictions, z: [b, D] projections of the other view, any float dtype; no
    gradient flows into z. One direction: SimSiam's loss is (simsiam_loss(p1, z2) +
    simsiam_loss(p2, z1)) / 2. Returns a float32 scalar in [-1, 1], equal on every device.
    """
    _check_same_shape("simsiam_loss", p, z)
    return _global_mean(-_cosine_to_target(p, z), axis_name)


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, *, lambd: float = 0.0051,
                      axis_name: str | None = None) -> jax.Array:
    """Barlow Twins: sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2.

    Each dimension of z1 and z2 is standardised over the global batch of N rows (mean 0,
    divided by sqrt(biased variance + 1e-5): BatchNorm without affine), and c = z1^T z2 / N is
    their [D, D] cross-correlation, summed across devices.

    z1, z2: [b, D] projections of the two views, any float dtype. Returns a float32 scalar,
    equal on every device.
    """
    _check_same_shape("barlow_twins_loss", z1, z2)
    n = _global_batch(z1.shape[0], axis_name)

    def standardised(z):
        z = _centred(z, axis_name)
        var = _global_sum(jnp.sum(z * z, axis=0), axis_name) / n
        return z * jax.lax.rsqrt(var + _BARLOW_EPS)

    c = _cross(standardised(z1), standardised(z2), axis_name) / n
    return (jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
            + lambd * jnp.sum(jnp.square(_off_diagonal(c))))


def vicreg_loss_with_terms(
    z1: jax.Array, z2: jax.Array, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
    cov_coeff: float = 1.0, axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """VICReg's loss (the paper's and its official code's) and its three unweighted terms.

    invariance = mean((z1 - z2)^2); each of z1, z2 centred over the global batch of N rows;
    std = sqrt(unbiased variance + 1e-4) per dimension; variance = mean(relu(1 - std1)) / 2 +
    mean(relu(1 - std2)) / 2; cov = z^T z / (N - 1) summed across devices; covariance =
    sum(offdiag(cov1)^2) / D + sum(offdiag(cov2)^2) / D. loss = sim_coeff * invariance +
    std_coeff * variance + cov_coeff * covariance.

    z1, z2: [b, D] embeddings (the expander's outputs) of the two views, any float dtype; the
    global batch needs N >= 2 rows.

    Returns:
      (loss, {"invariance", "variance", "covariance"}): float32 scalars, equal on every device.
    """
    _check_same_shape("vicreg_loss", z1, z2)
    n, d = _global_batch(z1.shape[0], axis_name), z1.shape[1]
    if n < 2:
        raise ValueError("vicreg_loss needs a global batch of at least 2 rows (the variance is "
                         f"unbiased); got {n}")

    def variance_and_covariance(z):
        z = _centred(z, axis_name)
        cov = _cross(z, z, axis_name) / (n - 1)
        std = jnp.sqrt(jnp.diagonal(cov) + _VICREG_EPS)  # the diagonal: the unbiased variance
        return (jnp.mean(jax.nn.relu(1.0 - std)),
                jnp.sum(jnp.square(_off_diagonal(cov))) / d)

    v1, c1 = variance_and_covariance(z1)
    v2, c2 = variance_and_covariance(z2)
    terms = {"invariance": _global_mean(jnp.square(_as_float(z1) - _as_float(z2)), axis_name),
             "variance": (v1 + v2) / 2.0,
             "covariance": c1 + c2}
    loss = (sim_coeff * terms["invariance"] + std_coeff * terms["variance"]
            + cov_coeff * terms["covariance"])
    return loss, terms


def vicreg_loss(z1: jax.Array, z2: jax.Array, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0,
                axis_name: str | None = None) -> jax.Array:
    """VICReg's loss (scalar float32); see `vicreg_loss_with_terms`."""
    return vicreg_loss_with_terms(z1, z2, sim_coeff=sim_coeff, std_coeff=std_coeff,
                                  cov_coeff=cov_coeff, axis_name=axis_name)[0]
