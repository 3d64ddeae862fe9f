"""Backbone features of whole datasets, computed on the devices in batches (for kNN and probes).

Images are centre-cropped and resized on the host only when they are not already at the model's
input size, then normalised and encoded on the devices in eval mode (BatchNorm running
statistics), each batch split over the mesh's data axis.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxssl.parallel import DATA_AXIS, host_to_global

__all__ = ["FeatureExtractor", "NonFiniteFeaturesError", "EvaluationInterrupted", "eval_images"]


class EvaluationInterrupted(Exception):
    """A feature pass ended early because its `stop` callback asked it to (a preemption)."""


class NonFiniteFeaturesError(FloatingPointError):
    """The encoder returned NaN or infinite features."""


def eval_images(source, indices: Sequence[int], size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """The images at `indices` as uint8 [n, size, size, 3].

    Images already size x size are returned as they are; others are resized so their shorter side
    is size / crop_fraction and centre-cropped (the usual ImageNet evaluation transform).
    """
    if source.images is not None and source.images.shape[1:3] == (size, size):
        return source.images[np.asarray(indices)]
    from PIL import Image

    out = np.empty((len(indices), size, size, 3), np.uint8)
    short = max(size, round(size / crop_fraction))
    for i, image in enumerate(source.read(indices)):
        h, w = image.shape[:2]
        scale = short / min(h, w)
        nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i] = resized[top:top + size, left:left + size]
    return out


class FeatureExtractor:
    """Eval-mode backbone features of dataset images, computed on every device of `mesh`.

    apply_fn: as for the steps; `outputs[output]` is returned ("features", the backbone's
    representation, or e.g. "logits" of a `jaxssl.evaluate.finetune.Classifier`). mean, std:
    per-channel normalisation of pixel / 255 (the training source's). batch_size: global images
    per forward pass, rounded up to a multiple of the devices.
    augment_fn: optional `augment_fn(images uint8 [b, S, S, 3], keys [b]) -> normalised float
    [b, S', S', 3]` run on the device instead of the plain normalisation (random crops and flips
    for an augmented linear probe, `jaxssl.evaluate.finetune.finetune_augment`); the key of the
    row at position p of `indices` is fold_in(key(seed), p), so each position draws its own view
    whatever the batch size or the devices.
    """

    def __init__(self, apply_fn: Callable, mesh: Mesh, *, mean, std, size: int,
                 batch_size: int = 512, dtype=jnp.float32, output: str = "features",
                 augment_fn: Callable | None = None, seed: int = 0):
        self.mesh, self.size = mesh, size
        n_dev = mesh.shape[DATA_AXIS]
        self.batch_size = -(-batch_size // n_dev) * n_dev
        mean = jnp.asarray(mean, jnp.float32)
        std = jnp.asarray(std, jnp.float32)
        root_key = jax.random.key(seed)

        def features(params, batch_stats, images, positions):
            if augment_fn is None:
                x = ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
            else:
                keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root_key, positions)
                x = augment_fn(images, keys).astype(dtype)
            outputs, _ = apply_fn(params, batch_stats, x, train=False)
            f = outputs[output].astype(jnp.float32)
            return f, jnp.all(jnp.isfinite(f))

        self._features = jax.jit(features)

    def __call__(self, params, batch_stats, source, indices: Sequence[int], *,
                 padded: bool = False, stop: Callable[[], bool] | None = None) -> jax.Array:
        """Features of source[indices]: float32 [len(indices), F], a global jax.Array.

        padded=True: [R, F] with R >= len(indices) a multiple of the devices, split over the
        mesh's data axis (no device holds all rows: what a bank of millions needs), rows from
        len(indices) on zero. Unpadded, the rows split over the devices too when their number
        divides evenly, and are replicated otherwise.
        NonFiniteFeaturesError when any feature is NaN or infinite.
        stop: asked before each batch (every process must give the same answer, e.g. one
        agreed by a collective); EvaluationInterrupted when it says True.
        """
        indices = np.asarray(indices)
        n, b = len(indices), self.batch_size
        pi, pc = jax.process_index(), jax.process_count()
        n_dev = self.mesh.shape[DATA_AXIS]
        num_batches = -(-n // b)
        # Every batch is written into one preallocated [num_batches * b, F] array split over
        # the devices (donated, updated in place): the features are held once, never as a list
        # of batches plus their concatenation, and the update compiles once for any n.
        out, finite, chunks = None, [], []
        # Many batches (a large bank): each is written into one preallocated [num_batches * b,
        # F] array split over the devices, in place, so the features are held once and no
        # device ever holds them all. A few batches: one concatenation is simpler and as small.
        in_place = num_batches >= n_dev
        for i in range(num_batches):
            if stop is not None and stop():
                raise EvaluationInterrupted(f"stopped before batch {i + 1} of {num_batches}")
            idx = indices[i * b:(i + 1) * b]
            idx = np.concatenate([idx, np.full(b - len(idx), idx[0])])  # pad the last batch
            local = idx.reshape(pc, -1)[pi]  # this process's rows of the global batch
            positions = (i * b + np.arange(b, dtype=np.int32)).reshape(pc, -1)[pi]
            images, positions = host_to_global(
                (eval_images(source, local, self.size), positions), self.mesh)
            f, ok = self._features(params, batch_stats, images, positions)
            if not in_place:
                chunks.append(f)
            else:
                if out is None:
                    out = _zeros(num_batches * b, f.shape[1],
                                 NamedSharding(self.mesh, P(DATA_AXIS)))
                out = _row_writer(self.mesh)(out, f, jnp.int32(i * b), jnp.int32(n))
            finite.append(ok)
        if not all(bool(ok) for ok in jax.device_get(finite)):
            raise NonFiniteFeaturesError(
                "the encoder returned non-finite (NaN or inf) features in eval mode; if the "
                "training loss is finite, this is a known XLA:CPU miscompilation in jax >= 0.11: "
                "run with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=")
        split = NamedSharding(self.mesh, P(DATA_AXIS))
        if not in_place:
            out = jax.jit(lambda *c: _mask_rows(jnp.concatenate(c), 0, n),
                          out_shardings=split)(*chunks)
        if padded:
            return out
        rows_out = split if n % n_dev == 0 else NamedSharding(self.mesh, P())
        return jax.jit(lambda x: x[:n], out_shardings=rows_out)(out)


def _zeros(rows: int, dim: int, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros((rows, dim), jnp.float32), out_shardings=sharding)()


def _mask_rows(f, start, n):
    """f [b, F] whose row j is global row start + j, with rows from n on set to zero."""
    return jnp.where((start + jnp.arange(f.shape[0]) < n)[:, None], f, 0.0)


@functools.lru_cache(maxsize=8)
def _row_writer(mesh: Mesh):
    """(out [R, F] split over the devices, f [b, F] split too, start, n) -> out with rows
    [start, start + b) set to f (rows from n zero), each device writing only its own rows.

    jit of a dynamic-offset update of a split array would gather the whole array to every
    device; here each device gathers the b new rows (small) and updates a window of b of its
    own L = R / devices rows (L >= b), keeping the rows of the window that are not new.
    """

    def write(out_local, f_local, start, n):
        f = _mask_rows(jax.lax.all_gather(f_local, DATA_AXIS, tiled=True), start, n)  # [b, F]
        rows, b = out_local.shape[0], f.shape[0]
        base = jax.lax.axis_index(DATA_AXIS) * rows  # global row of this device's first row
        offset = jnp.clip(start - base, 0, rows - b)  # the window [offset, offset + b)
        src = base + offset + jnp.arange(b) - start  # which new row lands at each window row
        new = (src >= 0) & (src < b)
        old = jax.lax.dynamic_slice_in_dim(out_local, offset, b)
        window = jnp.where(new[:, None], f[jnp.clip(src, 0, b - 1)], old)
        return jax.lax.dynamic_update_slice_in_dim(out_local, window, offset, axis=0)

    sharded = jax.shard_map(write, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                            out_specs=P(DATA_AXIS))
    return jax.jit(sharded, donate_argnums=(0,))
