"""Device-side augmentation: the recipes of `jaxssl.data.recipes` as JAX functions.

Every op works on one image and is vmapped over the batch, with one PRNG key per image and
view, so the step can run it inside jit on the accelerator. No TensorFlow here.
Images are float32 [H, W, 3] in [0, 1] unless said otherwise.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxssl.data.recipes import DEVICE_OPS, LUMA, Recipe, ViewRecipe, blur_kernel_size

__all__ = [
    "crop_resize", "flip", "adjust_brightness", "adjust_contrast", "adjust_saturation",
    "adjust_hue", "to_grayscale", "gaussian_blur", "solarize", "sample_crop", "augment_view",
    "make_device_augment",
]

_TRIES = 10  # torchvision's number of attempts at a valid crop


def _luma(x):
    return x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]


def _axis_coords(start, size, in_len, out_len):
    """Source coordinates of one axis: (lo [out], hi [out], frac [out])."""
    size_f = size.astype(jnp.float32)
    t = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * size_f / out_len - 0.5
    t = jnp.clip(t, 0.0, size_f - 1.0)  # clamp inside the crop: exactly crop-then-resize
    lo = jnp.floor(t)
    frac = t - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, size - 1)
    return jnp.clip(lo + start, 0, in_len - 1), jnp.clip(hi + start, 0, in_len - 1), frac


def crop_resize(image, y0, x0, h, w, out_h: int, out_w: int):
    """Crop [y0:y0+h, x0:x0+w] and resize bilinearly (half-pixel centres, no antialiasing).

    image: [H, W, C] any dtype; y0, x0, h, w: int32 scalars (may be traced). Returns float32
    [out_h, out_w, C] in the input's scale.
    """
    H, W = image.shape[:2]
    y_lo, y_hi, fy = _axis_coords(jnp.asarray(y0, jnp.int32), jnp.asarray(h, jnp.int32), H, out_h)
    x_lo, x_hi, fx = _axis_coords(jnp.asarray(x0, jnp.int32), jnp.asarray(w, jnp.int32), W, out_w)
    img = jnp.asarray(image, jnp.float32)
    top, bottom = img[y_lo], img[y_hi]  # [out_h, W, C]
    fx = fx[None, :, None]
    top = top[:, x_lo] * (1 - fx) + top[:, x_hi] * fx
    bottom = bottom[:, x_lo] * (1 - fx) + bottom[:, x_hi] * fx
    fy = fy[:, None, None]
    return top * (1 - fy) + bottom * fy


def flip(image):
    return image[:, ::-1]


def adjust_brightness(x, f):
    return jnp.clip(x * f, 0.0, 1.0)


def adjust_contrast(x, f):
    m = jnp.mean(_luma(x))
    return jnp.clip((x - m) * f + m, 0.0, 1.0)


def adjust_saturation(x, f):
    g = _luma(x)[..., None]
    return jnp.clip((x - g) * f + g, 0.0, 1.0)


def _rgb_to_hsv(x):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = jnp.max(x, axis=-1)
    delta = v - jnp.min(x, axis=-1)
    safe_delta = jnp.where(delta > 0, delta, 1.0)
    s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
    rc, gc, bc = (v - r) / safe_delta, (v - g) / safe_delta, (v - b) / safe_delta
    # The sector from argmax, not from `r == v`: XLA may fuse the producer of x into the max and
    # into r separately and round them differently, and a float equality then picks the wrong
    # sector (seen on XLA:CPU under jit(vmap) after the crop's gather). argmax keeps the
    # first-maximum tie rule of colorsys.
    sector = jnp.argmax(x, axis=-1)
    h = jnp.where(sector == 0, bc - gc, jnp.where(sector == 1, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    # Branch-free form of the sector formula: channel n in (R, G, B) = (5, 3, 1) is
    # v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
    def channel(n):
        k = (n + 6.0 * h) % 6.0
        return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hue(x, d):
    """Rotate hue by d turns (d in [-0.5, 0.5])."""
    h, s, v = _rgb_to_hsv(x)
    return jnp.clip(_hsv_to_rgb((h + d) % 1.0, s, v), 0.0, 1.0)


def to_grayscale(x):
    return jnp.repeat(_luma(x)[..., None], 3, axis=-1)


def _reflect_blur_matrix(g, n: int):
    """[n, n] matrix M with (M @ v)[i] = sum_t g[t] * v[reflect(i + t - r)], r = (len(g) - 1) / 2:
    a 1-D blur of a length-n signal with reflect padding (jnp.pad's "reflect": -1 -> 1,
    n -> n - 2) as one matrix."""
    k = g.shape[0]
    r = (k - 1) // 2
    src = jnp.arange(n)[:, None] + jnp.arange(k)[None, :] - r  # [n, k]
    src = jnp.abs(src)
    src = jnp.where(src > n - 1, 2 * (n - 1) - src, src)
    one_hot = (src[:, :, None] == jnp.arange(n)[None, None, :]).astype(jnp.float32)  # [n, k, n]
    return jnp.einsum("t,itj->ij", g, one_hot, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(x, sigma, k: int):
    """Separable Gaussian blur, kernel side k (odd, static, less than twice each side), reflect
    padding. x: [H, W, C].

    Each pass is one product with a banded [n, n] matrix that holds the kernel and the padding,
    in full float32 precision: one dot per axis for XLA, whatever k is. (It replaces a sum of k
    shifted slices per axis. With that sum, the ResNet-50 step with the 224 px recipe on the
    device, k = 23, had not finished compiling after 220 s on an H200, while the same step
    without augmentation compiled in 70 s and the 32 px recipe, which has no blur, in 56 s; the
    blur was the one op only the 224 px path has. Not yet re-measured on a GPU.)
    """
    r = (k - 1) // 2
    t = jnp.arange(-r, r + 1, dtype=jnp.float32)
    g = jnp.exp(-(t ** 2) / (2.0 * jnp.asarray(sigma, jnp.float32) ** 2))
    g = g / jnp.sum(g)
    H, W = x.shape[:2]
    hi = jax.lax.Precision.HIGHEST
    x = jnp.asarray(x, jnp.float32)
    rows = jnp.einsum("ih,hwc->iwc", _reflect_blur_matrix(g, H), x, precision=hi)
    return jnp.einsum("jw,iwc->ijc", _reflect_blur_matrix(g, W), rows, precision=hi)


def solarize(x, threshold: float = 0.5):
    return jnp.where(x >= threshold, 1.0 - x, x)


def sample_crop(key, height: int, width: int, scale, ratio):
    """torchvision's RandomResizedCrop box for a [height, width] image: (y0, x0, h, w) int32."""
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = height * width
    target = area * jax.random.uniform(k_area, (_TRIES,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (_TRIES,), minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    w = jnp.round(jnp.sqrt(target * r)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / r)).astype(jnp.int32)
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = jnp.argmax(ok)
    # Fallback (no try fits): the whole image, clipped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    any_ok = jnp.any(ok)
    h = jnp.where(any_ok, h[first], fh)
    w = jnp.where(any_ok, w[first], fw)
    y0 = jnp.floor(jax.random.uniform(k_y) * (height - h + 1)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k_x) * (width - w + 1)).astype(jnp.int32)
    y0 = jnp.where(any_ok, jnp.minimum(y0, height - h), (height - fh) // 2)
    x0 = jnp.where(any_ok, jnp.minimum(x0, width - w), (width - fw) // 2)
    return y0, x0, h, w


def _factor(key, amount):
    return jax.random.uniform(key, minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)


def _colour(key, x, view: ViewRecipe):
    keys = jax.random.split(key, 7)
    fb = _factor(keys[0], view.brightness)
    fc = _factor(keys[1], view.contrast)
    fs = _factor(keys[2], view.saturation)
    dh = jax.random.uniform(keys[3], minval=-view.hue, maxval=view.hue)
    order = jax.random.permutation(keys[4], 4)
    branches = [
        lambda y: adjust_brightness(y, fb),
        lambda y: adjust_contrast(y, fc),
        lambda y: adjust_saturation(y, fs),
        lambda y: adjust_hue(y, dh),
    ]
    jittered = x
    for position in range(4):  # the four ops in a random order, as SimCLR
        # A where-chain rather than lax.switch: under vmap both evaluate every branch.
        outs = [branch(jittered) for branch in branches]
        choice = order[position]
        jittered = jnp.where(choice == 0, outs[0], jnp.where(
            choice == 1, outs[1], jnp.where(choice == 2, outs[2], outs[3])))
    x = jnp.where(jax.random.bernoulli(keys[5], view.jitter_prob), jittered, x)
    return jnp.where(jax.random.bernoulli(keys[6], view.grayscale_prob), to_grayscale(x), x)


def augment_view(key, image, view: ViewRecipe, out_size: int, ops: Sequence[str], mean, std):
    """One view of one image. image: [H, W, 3] uint8 (or float in [0, 255]); key: this image's
    and view's key; ops: which of crop, flip, colour, blur, solarize run here.
    Returns float32 [out_size, out_size, 3], normalised with mean/std (per channel, [0, 1] units).
    """
    k_crop, k_flip, k_colour, k_blur, k_sigma, k_solar = jax.random.split(key, 6)
    H, W = image.shape[:2]
    if "crop" in ops:
        y0, x0, h, w = sample_crop(k_crop, H, W, view.crop_scale, view.crop_ratio)
    else:
        y0, x0, h, w = 0, 0, H, W
    if (H, W) == (out_size, out_size) and "crop" not in ops:
        x = jnp.asarray(image, jnp.float32)
    else:
        x = crop_resize(image, y0, x0, h, w, out_size, out_size)
    x = x / 255.0
    if "flip" in ops:
        x = jnp.where(jax.random.bernoulli(k_flip, view.flip_prob), flip(x), x)
    if "colour" in ops:
        x = _colour(k_colour, x, view)
    k = blur_kernel_size(out_size, view)
    if "blur" in ops and k:
        sigma = jax.random.uniform(k_sigma, minval=view.blur_sigma[0], maxval=view.blur_sigma[1])
        x = jnp.where(jax.random.bernoulli(k_blur, view.blur_prob), gaussian_blur(x, sigma, k), x)
    if "solarize" in ops and view.solarize_prob > 0:
        x = jnp.where(jax.random.bernoulli(k_solar, view.solarize_prob), solarize(x), x)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_device_augment(recipe: Recipe, out_size: int, mean, std, mode: str = "device",
                        dtype=jnp.float32) -> Callable:
    """An `augment_fn(batch, keys) -> (x1, x2)` for `simclr_step` (and the other steps).

    mode "device": batch is images uint8 [b, H, W, 3] and every op runs here.
    mode "split":  batch is (v1, v2), uint8 [b, S, S, 3] each, already cropped and flipped on the
                   host; colour, blur and solarize run here.
    keys: [b] one key per image (see `jaxssl.steps.example_keys`); each view splits its own.
    Outputs: float [b, out_size, out_size, 3] in `dtype`, normalised.
    """
    if mode not in DEVICE_OPS or mode == "host":
        raise ValueError(f"device augmentation mode must be 'device' or 'split'; got {mode!r}")
    ops = DEVICE_OPS[mode]

    def one(view, key, image):
        return augment_view(key, image, view, out_size, ops, mean, std).astype(dtype)

    def augment_fn(batch, keys):
        k1, k2 = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        first, second = (batch, batch) if mode == "device" else batch
        x1 = jax.vmap(lambda k, im: one(recipe.view1, k, im))(k1, first)
        x2 = jax.vmap(lambda k, im: one(recipe.view2, k, im))(k2, second)
        return x1, x2

    return augment_fn
