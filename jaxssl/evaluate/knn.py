"""Weighted k-nearest-neighbour classification of features (the SSL monitor of InstDisc/MoCo).

Cosine similarity; the k most similar bank entries vote for their labels with weight
exp(similarity / temperature); the class with the largest total wins.

Built for banks of millions of features (ImageNet: 1,281,167 x 2048 for a ResNet-50) on one
accelerator or on a pod:

- With a mesh, the bank is split row-wise over DATA_AXIS; no device ever holds more than its
  own rows (plus padding to a multiple of the devices).
- Each device walks its rows in chunks of `bank_chunk_size`, keeping a running top-k per query,
  so working memory is about query chunk x bank chunk, whatever the bank's size. The result is
  exactly the unchunked top-k.
- Only each device's k candidates per query are gathered across devices to pick the global k.
- The bank may be stored in bfloat16 (`bank_dtype`) to halve its memory; similarities are
  always computed and accumulated in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxssl.losses import l2_normalize
from jaxssl.parallel import DATA_AXIS, put_global

__all__ = ["knn_scores", "knn_top1"]

_NORM_EPS = 1e-12  # as in losses.l2_normalize: an all-zero feature gets similarity 0, not NaN
_VOTE_BLOCK_ELEMENTS = 1 << 22  # one-hot elements per vote block: 16 MiB of float32


def _top_k(sim, labels, k):
    """The k largest similarities [q, k] and their labels, of candidates [q, m] (m >= k).

    On equal similarities the earlier column wins, as in one top_k over the whole bank: callers
    put lower-numbered bank rows first.
    """
    top_sim, pick = jax.lax.top_k(sim, k)
    return top_sim, jnp.take_along_axis(labels, pick, axis=1)


def _vote(top_sim, top_labels, num_classes, temperature):
    """[q, k] similarities and labels -> class scores [q, C] float32.

    The neighbours are counted in blocks whose [q, block, C] one-hot stays near 16 MiB: the whole
    [q, k, C] would be 200 MB for 256 queries, k 200 and ImageNet's 1000 classes. Compare-and-sum
    rather than a one-hot matmul (at default precision a TPU rounds its operands to bfloat16, a
    GPU may use TF32) or a scatter-add (whose order of additions varies on a GPU): float32 sums
    in a fixed order on every backend.
    """
    q, k = top_sim.shape
    weights = jnp.where(jnp.isfinite(top_sim), jnp.exp(top_sim / temperature), 0.0)
    block = max(1, min(k, _VOTE_BLOCK_ELEMENTS // (q * num_classes)))
    pad = -k % block  # zero-weight neighbours
    blocks = [jnp.pad(x, ((0, 0), (0, pad))).reshape(q, -1, block).swapaxes(0, 1)
              for x in (weights, top_labels)]
    classes = jnp.arange(num_classes, dtype=top_labels.dtype)

    def add(scores, wl):
        w, labels = wl  # [q, block]
        hit = labels[:, :, None] == classes
        return scores + jnp.sum(jnp.where(hit, w[:, :, None], 0.0), axis=1), None

    scores, _ = jax.lax.scan(add, jnp.zeros((q, num_classes), jnp.float32), blocks)
    return scores


def _rows_f32(bank, start, size):
    """bank[start:start + size] widened to float32 (exactly: every float dtype fits).

    The barrier ties the bank to this iteration's `start`. Without it, a backend that cannot
    slice a 16-bit float natively (XLA:CPU with bfloat16) widens the whole bank to float32, and
    since that is the same in every iteration it is hoisted out of the loop: a float32 copy of
    all of the bank, which bank_dtype=bfloat16 exists to avoid. With it, the widening fuses into
    the slice and touches only the chunk's rows.
    """
    bank, _ = jax.lax.optimization_barrier((bank, start))
    return jax.lax.dynamic_slice_in_dim(bank, start, size).astype(jnp.float32)


def _device_scores(queries, bank, labels, *, n_valid, k, num_classes, temperature, chunk,
                   bank_chunk, axis_name):
    """One device's share: class scores float32 [Qp, C], the same on every device.

    queries: float32 [Qp, D] unit rows (every device has all of them), Qp a multiple of chunk.
    bank: [n, D] this device's rows of the bank as stored (any float dtype, not normalised).
    labels: int32 [n]. n_valid: rows of the whole bank that are real (the rest is padding).
    """
    n, d = bank.shape
    # The shards are consecutive row blocks in device order, so this shard starts at row
    # axis_index * n of the (padded) bank.
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    # As few chunks as bank_chunk allows, all of one size and as even as possible, so the last
    # chunk's overlap with the one before (below) wastes under n_chunks rows of work.
    n_chunks = -(-n // bank_chunk)
    bc = -(-n // n_chunks)

    def one_query_chunk(q):  # [chunk, D] -> [chunk, C]
        def one_bank_chunk(best, i):
            # The last chunk is moved back to end at row n: every chunk has bc rows (one
            # compiled shape) and the bank needs no padding copy. Rows it shares with the chunk
            # before were seen there and are masked out here.
            start = jnp.minimum(i * bc, n - bc)
            # float32 similarities, whatever the storage dtype: a bfloat16 bank is widened
            # exactly, so its only error is its own rounding.
            rows = _rows_f32(bank, start, bc)  # [bc, D]
            sim = jnp.dot(q, rows.T, precision=jax.lax.Precision.HIGHEST)
            # The bank is not normalised in place (a copy of all of it); scaling the columns by
            # the rows' inverse norms gives the same cosine for bc * D more work per chunk.
            sq = jnp.sum(rows * rows, axis=1)
            sim = sim * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))[None, :]
            row = start + jnp.arange(bc)
            fresh = (row >= i * bc) & (offset + row < n_valid)  # padding rows never win
            sim = jnp.where(fresh[None, :], sim, -jnp.inf)
            top_sim, top_idx = jax.lax.top_k(sim, min(k, bc))
            top_labels = jax.lax.dynamic_slice_in_dim(labels, start, bc)[top_idx]
            # The running k (earlier rows) first, then this chunk's: the k best of both.
            return _top_k(jnp.concatenate([best[0], top_sim], axis=1),
                          jnp.concatenate([best[1], top_labels], axis=1), k), None

        # -inf entries stand for "no neighbour yet" (k may exceed the bank): they get weight 0.
        init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
                jnp.zeros((q.shape[0], k), jnp.int32))
        (top_sim, top_labels), _ = jax.lax.scan(one_bank_chunk, init, jnp.arange(n_chunks))
        if axis_name is not None:
            # Every device's k best, [chunk, devices * k] in device order (so lower bank rows
            # first on ties); the global top-k is among them.
            top_sim = jax.lax.all_gather(top_sim, axis_name, axis=1, tiled=True)
            top_labels = jax.lax.all_gather(top_labels, axis_name, axis=1, tiled=True)
            top_sim, top_labels = _top_k(top_sim, top_labels, k)
        return _vote(top_sim, top_labels, num_classes, temperature)

    qp = queries.shape[0]
    chunks = queries.reshape(qp // chunk, chunk, queries.shape[1])
    return jax.lax.map(one_query_chunk, chunks).reshape(qp, num_classes)


@functools.lru_cache(maxsize=32)
def _program(mesh, *, n_valid, k, num_classes, temperature, chunk, bank_chunk):
    """The jitted (raw queries [Q, D], bank, labels) -> scores [Q, C]; cached, so the trainer's
    repeated evaluations reuse one compiled program."""
    fn = functools.partial(_device_scores, n_valid=n_valid, k=k, num_classes=num_classes,
                           temperature=temperature, chunk=chunk, bank_chunk=bank_chunk,
                           axis_name=None if mesh is None else DATA_AXIS)
    if mesh is not None:
        # The scores are identical on every device (computed from the gathered candidates), but
        # the replication checker cannot see through top_k of gathered values: turn it off.
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                           out_specs=P(), check_vma=False)

    def program(queries, bank, labels):
        q = queries.shape[0]
        queries = jnp.pad(l2_normalize(queries), ((0, -q % chunk), (0, 0)))
        return fn(queries, bank, labels)[:q]

    return jax.jit(program)


def _place_bank(bank, mesh: Mesh | None, dtype) -> jax.Array:
    """The bank as knn_scores stores it: [N', D] `dtype`, not normalised.

    Without a mesh: [N, D] where it is (a host array goes to the default device). With one:
    N' = N rounded up to a multiple of the devices (zero rows after the real ones), split over
    DATA_AXIS, and no device is ever given the whole bank.
    """
    if mesh is None:
        return jnp.asarray(bank, dtype=dtype)
    shard = NamedSharding(mesh, P(DATA_AXIS))
    n, d = bank.shape
    n_pad = -n % mesh.shape[DATA_AXIS]
    if isinstance(bank, jax.Array):
        if bank.sharding.device_set == shard.device_set:
            if n_pad == 0 and bank.dtype == dtype and bank.sharding.is_equivalent_to(shard, 2):
                return bank  # already as needed: no copy at all
            # Padded and cast on the mesh, straight into the row split.
            pad_cast = jax.jit(lambda b: jnp.pad(b.astype(dtype), ((0, n_pad), (0, 0))),
                               out_shardings=shard)
            return pad_cast(bank)
        # On other devices (e.g. a single one outside the mesh): pad and cast where it lives,
        # then move each device its rows.
        return put_global(jnp.pad(bank.astype(dtype), ((0, n_pad), (0, 0))), shard)
    # A host array: each device is sent only its own rows, padded and cast one block at a time,
    # so neither a device nor a second host buffer ever holds the whole bank. In a multi-process
    # run each process fills its own devices from its copy.
    bank = np.asarray(bank)
    np_dtype = np.dtype(dtype)

    def rows(index):
        block = bank[index[0]].astype(np_dtype)
        want = len(range(*index[0].indices(n + n_pad)))
        return np.pad(block, ((0, want - len(block)), (0, 0)))

    return jax.make_array_from_callback((n + n_pad, d), shard, rows)


def _place(x, mesh: Mesh | None, spec: P):
    """x on the mesh with `spec`; left alone when it is already a jax.Array on the mesh's devices
    (jit reshards it there) or when there is no mesh."""
    if mesh is None:
        return x
    sharding = NamedSharding(mesh, spec)
    if isinstance(x, jax.Array) and x.sharding.device_set == sharding.device_set:
        return x
    return put_global(x, sharding)


def knn_scores(bank, bank_labels, queries, *, num_classes: int, k: int = 200,
               temperature: float = 0.1, chunk_size: int = 256, bank_chunk_size: int = 65536,
               bank_dtype=jnp.float32, mesh: Mesh | None = None,
               bank_rows: int | None = None) -> np.ndarray:
    """Class scores of every query: float32 [Q, num_classes] (numpy).

    bank: [N, D] features, any float dtype, numpy or jax.Array (not necessarily normalised: the
      cosine is taken here). A jax.Array on the mesh's devices stays on them.
    bank_labels: int [N] in [0, num_classes). queries: [Q, D] any float dtype.
    chunk_size: queries per step; bank_chunk_size: bank rows per step and device. Working memory
      is about chunk_size x bank_chunk_size float32 similarities (64 MiB at the defaults) plus
      one bank chunk widened to float32, independent of N; the bank itself takes
      N x D x itemsize(bank_dtype) over all devices.
    bank_dtype: how the bank is stored: float32, or bfloat16 for half the memory (similarities
      are still computed from float32 queries and accumulated in float32; only the bank's own
      rounding, about 3 significant digits, changes the result).
    mesh: split the bank over its DATA_AXIS (each device keeps its rows' top-k; the global top-k
      is picked from the devices' candidates) and give every device all queries. Without a
      mesh, everything runs where the bank is (a host bank: the default device).
    bank_rows: only the first bank_rows rows of bank are real and bank_labels has one label for
      each of them; the rest is padding that never wins (e.g. the padded, device-split output
      of `FeatureExtractor(..., padded=True)`, used without a copy). Default: all rows.
    """
    bank = bank if isinstance(bank, jax.Array) else np.asarray(bank)
    queries = queries if isinstance(queries, jax.Array) else np.asarray(queries)
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0; got k={k}, temperature={temperature}")
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError(f"need chunk sizes >= 1; got chunk_size={chunk_size}, "
                         f"bank_chunk_size={bank_chunk_size}")
    if not jnp.issubdtype(bank_dtype, jnp.floating):
        raise ValueError(f"bank_dtype must be a float dtype; got {bank_dtype}")
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (bank, queries)):
        raise ValueError(f"bank and queries must be float arrays; got {bank.dtype}, "
                         f"{queries.dtype}")
    if bank.ndim != 2 or queries.ndim != 2:
        raise ValueError(f"bank and queries must be [N, D] and [Q, D]; got {bank.shape}, "
                         f"{queries.shape}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank features are {bank.shape[1]}-d but queries are "
                         f"{queries.shape[1]}-d")
    bank_labels = np.asarray(bank_labels, np.int32)
    n = bank.shape[0] if bank_rows is None else bank_rows
    if n < 1 or n > bank.shape[0] or bank_labels.shape != (n,):
        raise ValueError(f"need a non-empty bank and one label per row; got {n} rows "
                         f"({bank.shape[0]} with padding), labels {bank_labels.shape}")
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")
    bank_dtype = jnp.dtype(bank_dtype)
    bank = _place_bank(bank, mesh, bank_dtype)
    labels = np.pad(bank_labels, (0, bank.shape[0] - n))
    labels = labels if mesh is None else put_global(labels, NamedSharding(mesh, P(DATA_AXIS)))
    program = _program(mesh, n_valid=n, k=k, num_classes=num_classes,
                       temperature=float(temperature),
                       chunk=max(1, min(chunk_size, queries.shape[0])), bank_chunk=bank_chunk_size)
    return np.asarray(program(_place(queries, mesh, P()), bank, labels))


def knn_top1(bank, bank_labels, queries, query_labels, *, num_classes: int, k: int = 200,
             temperature: float = 0.1, chunk_size: int = 256, bank_chunk_size: int = 65536,
             bank_dtype=jnp.float32, mesh: Mesh | None = None,
             bank_rows: int | None = None) -> float:
    """Fraction of queries whose weighted kNN vote equals their label (arguments: knn_scores)."""
    scores = knn_scores(bank, bank_labels, queries, num_classes=num_classes, k=k,
                        temperature=temperature, chunk_size=chunk_size,
                        bank_chunk_size=bank_chunk_size, bank_dtype=bank_dtype, mesh=mesh,
                        bank_rows=bank_rows)
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(query_labels)))
