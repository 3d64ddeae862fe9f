"""A picture of what a recipe does: originals next to their two augmented views."""

from __future__ import annotations

import io

import numpy as np

from jaxssl import files
from jaxssl.data.recipes import Recipe

__all__ = ["preview_grid", "write_preview"]


def _to_uint8(x: np.ndarray, mean, std) -> np.ndarray:
    """Undo the normalisation: float [..., 3] -> uint8 [..., 3]."""
    x = np.asarray(x, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    rows = (np.arange(size) * h // size).clip(0, h - 1)
    cols = (np.arange(size) * w // size).clip(0, w - 1)
    return img[rows][:, cols]


def preview_grid(originals, view1, view2, mean, std, *, cell: int = 96, pad: int = 4) -> np.ndarray:
    """A uint8 [rows * (cell + pad) + pad, 3 * (cell + pad) + pad, 3] grid: one row per image,
    columns original | view 1 | view 2. originals: uint8 [n, H, W, 3] (or a list of them);
    view1, view2: normalised float [n, S, S, 3]."""
    n = len(originals)
    grid = np.full((n * (cell + pad) + pad, 3 * (cell + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        cells = [np.asarray(originals[i], np.uint8), _to_uint8(view1[i], mean, std),
                 _to_uint8(view2[i], mean, std)]
        for j, img in enumerate(cells):
            y, x = pad + i * (cell + pad), pad + j * (cell + pad)
            grid[y:y + cell, x:x + cell] = _resize_nearest(img, cell)
    return grid


def write_preview(path: str, source, recipe: Recipe, out_size: int, *, n: int = 8, seed: int = 0,
                  mode: str = "device", image_size: int | None = None) -> str:
    """Write a PNG preview of `recipe` on the first n images of `source`; returns the path.

    mode "device" uses the JAX augmentation (no TensorFlow needed; images must share one size,
    or image_size gives the square size they are resized and centre-cropped to first, as a
    device-augmented run from records does), "host" the tf.data one.
    """
    from PIL import Image

    idx = np.arange(min(n, source.num_examples))
    originals = source.images[idx] if source.images is not None else source.read(idx)
    if mode == "device" and source.images is None and image_size:
        from jaxssl.evaluate.features import eval_images

        originals = eval_images(source, idx, image_size, crop_fraction=1.0)
    if mode == "device":
        import jax

        from jaxssl.data.augment_jax import make_device_augment

        augment = make_device_augment(recipe, out_size, source.mean, source.std)
        keys = jax.random.split(jax.random.key(seed), len(idx))
        v1, v2 = jax.jit(augment)(np.stack(originals), keys)
    elif mode == "host":
        from jaxssl.data import augment_tf

        pairs = [augment_tf.two_views(img, np.array([seed, i], np.int64), recipe, out_size, "host",
                                      source.mean, source.std) for i, img in enumerate(originals)]
        v1 = np.stack([np.asarray(a) for a, _ in pairs])
        v2 = np.stack([np.asarray(b) for _, b in pairs])
    else:
        raise ValueError(f"preview mode must be 'device' or 'host'; got {mode!r}")
    grid = preview_grid(originals, np.asarray(v1), np.asarray(v2), source.mean, source.std)
    png = io.BytesIO()
    Image.fromarray(grid).save(png, format="PNG")
    files.makedirs(files.dirname(path))
    files.write_bytes(path, png.getvalue())  # local or remote (gs://)
    return path
