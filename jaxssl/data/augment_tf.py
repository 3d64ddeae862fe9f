"""Host augmentation: the recipes of `jaxssl.data.recipes` as TensorFlow ops for `tf.data`.

Every function works on ONE image (`tf.data.Dataset.map` before `batch`), in graph mode, with
image sizes known only at run time. Float images are float32 [H, W, 3] in [0, 1]; the op
definitions are those of the `recipes` module docstring, and each op is tested against the
float64 numpy references in tests/aug_reference.py.

Randomness is stateless: a view is a pure function of (image, seed [2] int), so a pipeline that
derives its seeds from (epoch, index) replays exactly after a resume, whatever the number of
parallel calls.

TensorFlow is imported lazily (`tf()` inside each function), so importing this module is free.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from jaxssl.data import recipes
from jaxssl.data.tf_import import tf

__all__ = ["crop_resize", "flip", "adjust_brightness", "adjust_contrast", "adjust_saturation",
           "adjust_hue", "to_grayscale", "gaussian_blur", "solarize", "sample_crop",
           "augment_view", "two_views", "two_views_encoded", "image_shape", "decode_window",
           "decode_resized"]

_CROP_TRIES = 10  # torchvision's RandomResizedCrop makes 10 attempts before its fallback
_CROP_DRAWS = 2 * _CROP_TRIES + 2  # (area, log ratio) per try, then (y0, x0)

# A view's randomness is one row u [_VIEW_DRAWS] float64 of ONE stateless draw per image:
# u[:_CROP_DRAWS] for the crop, then one slot per decision below. Element i of a stateless draw
# is Philox counter i of the seed, so slots and rows are independent streams (a counter folded
# into the seed), and fixed slots keep each decision the same whether or not other ops are
# enabled. One draw rather than a split per decision: in tf.data each op costs microseconds,
# which is most of the cost of a 32 px view.
_FLIP, _JITTER, _FACTORS, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = 0, 1, 2, 6, 7, 8, 9, 10
_VIEW_DRAWS = _CROP_DRAWS + 11  # _FACTORS takes 4 slots
_ORDERS = tuple(itertools.permutations(range(4)))  # the 24 jitter orders


# ----------------------------------------------------------------------------- geometry

def crop_resize(image, y0, x0, h, w, out_h: int, out_w: int):
    """Crop image[y0:y0+h, x0:x0+w] and resize it bilinearly to [out_h, out_w, C].

    image: [H, W, C] uint8 or float; y0, x0, h, w: int scalars (Python or tensors).
    Returns float32 [out_h, out_w, C] in the INPUT's scale (uint8 stays 0..255; dividing by 255
    is the caller's choice, so split mode can round back to uint8 losslessly).
    Half-pixel centres, no antialiasing, samples clamped to the crop: tf.image.resize's bilinear
    kernel on the crop is exactly the recipe's definition (tested against the reference).
    """
    T = tf()
    start = T.stack([T.cast(y0, T.int32), T.cast(x0, T.int32)])
    size = T.stack([T.cast(h, T.int32), T.cast(w, T.int32)])
    return _crop_resize(image, start, size, out_h, out_w)


def _crop_resize(image, start, size, out_h: int, out_w: int):
    """crop_resize with the box as start = (y0, x0), size = (h, w): [2] int tensors."""
    T = tf()
    image = T.convert_to_tensor(image)
    if image.dtype != T.uint8:
        image = T.cast(image, T.float32)
    # Slicing first makes the edge clamp the crop's own (tf.image.crop_and_resize instead
    # samples a corner-aligned grid over the box).
    crop = T.slice(image, T.concat([T.cast(start, T.int32), [0]], 0),
                   T.concat([T.cast(size, T.int32), [-1]], 0))
    out = T.image.resize(crop, [out_h, out_w], method="bilinear", antialias=False)
    return T.cast(out, T.float32)


def flip(image):
    """Horizontal flip of [H, W, C] (any dtype)."""
    return tf().reverse(image, axis=[1])


def sample_crop(seed, height, width, scale, ratio):
    """torchvision's RandomResizedCrop rule, statelessly. Returns (y0, x0, h, w) int32 scalars.

    seed: [2] int32/int64; height, width: int scalars (may be dynamic tensors);
    scale, ratio: (low, high) pairs of numbers or scalar tensors. One stateless draw
    u [22] float64 is consumed as (area fraction, log aspect ratio) of try t in u[2t], u[2t+1]
    for t < 10, then y0, x0 in u[20], u[21] (the tests rebuild the rule from these draws).
    The 10 tries are evaluated at once and the first valid one wins; if none is, the crop is
    the whole image clipped to the ratio range, centred.
    """
    T = tf()
    u = T.random.stateless_uniform([1, _CROP_DRAWS], _as_seed(seed), dtype=T.float64)
    start, size = _crop_box(u, T.stack([T.cast(height, T.int32), T.cast(width, T.int32)]),
                            scale, ratio)
    return start[0, 0], start[0, 1], size[0, 0], size[0, 1]


def _crop_box(u, hw, scale, ratio):
    """sample_crop for V crops of one image at once: u [V, 22] float64, hw = (H, W) [2] int.

    Returns start (y0, x0) and size (h, w), [V, 2] int32 each. Two views' crops in one go
    halve the op count per view, and each op costs microseconds in tf.data.
    """
    T = tf()
    f64, n = T.float64, _CROP_TRIES
    hw = T.cast(hw, f64)
    height, width = T.unstack(hw)
    tries, offsets = T.split(T.reshape(u, [-1, n + 1, 2]), [n, 1], axis=1)
    u_area, u_ratio = T.unstack(tries, axis=2)  # [V, n] each
    log_lo, log_hi = (math.log(v) if isinstance(v, (int, float)) else T.math.log(T.cast(v, f64))
                      for v in ratio)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    r = T.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # float64 and tf.round (half to even) reproduce torchvision's int(round(math.sqrt(...)))
    # on Python floats.
    h, w = T.round(T.sqrt(area / r)), T.round(T.sqrt(area * r))
    ok = (h > 0) & (h <= height) & (w > 0) & (w <= width)  # [V, n]
    # First valid try (argmax does not promise the first of ties, so take the min index).
    first = T.reduce_min(T.where(ok, T.range(n), n), axis=1)  # [V]
    found = (first < n)[:, None]
    picked = T.gather(T.stack([h, w], axis=2), T.minimum(first, n - 1), batch_dims=1)
    # Fallback, the whole image clipped to the ratio range: h = min(H, round(W / r_lo)),
    # w = min(W, round(H r_hi)) is torchvision's three-way case analysis in one line.
    clip = T.stack([1.0 / T.cast(ratio[0], f64), T.cast(ratio[1], f64)])
    size = T.where(found, picked, T.minimum(hw, T.round(T.reverse(hw, [0]) * clip)))
    room = hw - size
    # randint(0, room + 1) as floor(u (room + 1)); the min guards against rounding up.
    offsets = T.minimum(T.floor(T.reshape(offsets, [-1, 2]) * (room + 1)), room)
    start = T.where(found, offsets, T.floor(room / 2))
    return T.cast(start, T.int32), T.cast(size, T.int32)


# ----------------------------------------------------------------------------- colour

def _mix(x, m):
    """x @ m per pixel: [H, W, 3] float32, m [3, 3] -> [H, W, 3] float32.

    One [HW, 3] x [3, 3] matmul is several times faster on CPU than luma as a reduction over
    the 3-wide channel axis plus broadcasts.
    """
    T = tf()
    return T.reshape(T.matmul(T.reshape(x, [-1, 3]), m), T.shape(x))


def _luma_columns():
    """[3, 3] float32 whose every column is the luma weights: x @ it puts luma in all channels."""
    T = tf()
    return T.tile(T.constant(recipes.LUMA, T.float32)[:, None], [1, 3])


def adjust_brightness(x, f):
    """x * f, clipped. x: [H, W, 3] float32 in [0, 1]; f: scalar."""
    T = tf()
    return T.clip_by_value(x * T.cast(f, T.float32), 0.0, 1.0)


def adjust_contrast(x, f):
    """(x - m) f + m, m = mean luma of the image, clipped. x: [H, W, 3] float32.

    Not tf.image.adjust_contrast, which blends with each channel's own mean.
    """
    T = tf()
    f = T.cast(f, T.float32)
    # Luma is linear, so the mean of the luma is the luma of the per-channel means.
    m = T.reduce_sum(T.reduce_mean(x, axis=[0, 1]) * T.constant(recipes.LUMA, T.float32))
    return T.clip_by_value(x * f + (1.0 - f) * m, 0.0, 1.0)


def adjust_saturation(x, f):
    """(x - g) f + g, g = per-pixel luma, clipped. x: [H, W, 3] float32.

    Not tf.image.adjust_saturation, which scales HSV saturation instead of blending with luma.
    As a matrix: x @ (f I + (1 - f) luma 1^T).
    """
    T = tf()
    f = T.cast(f, T.float32)
    return T.clip_by_value(_mix(x, f * T.eye(3) + (1.0 - f) * _luma_columns()), 0.0, 1.0)


def adjust_hue(x, d):
    """Shift the HSV hue by d turns (any real d; wraps mod 1), clipped. x: [H, W, 3] float32.

    tf.image.adjust_hue's fused kernel is RGB -> HSV -> RGB as colorsys (matches the reference
    to ~1e-6); it only accepts |d| <= 1, so d is first reduced to [-0.5, 0.5] (same hue).
    """
    T = tf()
    d = T.cast(d, T.float32)
    d = d - T.round(d)
    return T.clip_by_value(T.image.adjust_hue(x, d), 0.0, 1.0)


def to_grayscale(x):
    """Every channel <- luma 0.299 R + 0.587 G + 0.114 B. x: [H, W, 3] float32 -> same shape.

    Not tf.image.rgb_to_grayscale: it uses 0.2989 for red, 1e-4 away from Pillow/torchvision.
    """
    return _mix(x, _luma_columns())


def _blur_matrix(g, n, r: int):
    """[n, n] float32 A with (A @ v) = v convolved with the taps g [2r + 1], reflect-padded.

    n: int32 scalar (may be dynamic); needs r <= n - 1 (a single reflection, as numpy/TF).
    """
    T = tf()
    n = T.cast(n, T.int32)
    cols = T.range(n)[:, None] + T.range(-r, r + 1)[None, :]  # [n, k] source pixel of each tap
    cols = (n - 1) - T.abs((n - 1) - T.abs(cols))  # reflect "d c b | a b c d": -1 -> 1
    rows = T.broadcast_to(T.range(n)[:, None], T.shape(cols))
    # scatter_nd sums duplicates: near a border two taps can read the same source pixel.
    return T.scatter_nd(T.stack([rows, cols], axis=-1), T.broadcast_to(g, T.shape(cols)),
                        T.stack([n, n]))


def gaussian_blur(x, sigma, k: int):
    """Separable Gaussian blur, reflect padding. x: [H, W, C] float32 with H, W > (k - 1) / 2.

    sigma: scalar (may be a tensor); k: Python odd int, the kernel side.
    Returns float32 [H, W, C] (not clipped: a convex combination stays in [0, 1]).
    """
    T = tf()
    x = T.convert_to_tensor(x, T.float32)
    r = (k - 1) // 2
    sigma = T.cast(sigma, T.float32)
    t = T.constant([float(i) for i in range(-r, r + 1)], T.float32)
    g = T.exp(-(t * t) / (2.0 * sigma * sigma))
    g = g / T.reduce_sum(g)
    # Each pass as one matmul by a banded [n, n] matrix that also does the reflect padding:
    # ~2.5x faster on CPU than depthwise_conv2d, whose per-channel kernels vectorise poorly.
    shape = T.shape(x)
    h, w = shape[0], shape[1]
    a_h = _blur_matrix(g, h, r)
    static = x.shape
    a_w = a_h if static[0] is not None and static[0] == static[1] else _blur_matrix(g, w, r)
    y = T.reshape(T.matmul(a_h, T.reshape(x, T.stack([h, -1]))), shape)  # vertical
    y = T.transpose(y, [1, 0, 2])
    y = T.reshape(T.matmul(a_w, T.reshape(y, T.stack([w, -1]))), T.gather(shape, [1, 0, 2]))
    return T.transpose(y, [1, 0, 2])  # horizontal pass done on the transposed image


def solarize(x, threshold=0.5):
    """x <- 1 - x where x >= threshold. x: float32 in [0, 1]."""
    T = tf()
    if isinstance(threshold, float) and threshold == 0.5:
        # Exactly the same values (1 - x is exact for x in [0.5, 1]), and several times faster
        # than tf.where's broadcasting select.
        return T.minimum(x, 1.0 - x)
    return T.where(x >= T.cast(threshold, x.dtype), 1.0 - x, x)


def _jitter(x, view: recipes.ViewRecipe, factors, order):
    """Brightness, contrast, saturation, hue with `factors` (4 float32 scalars: f_brightness,
    f_contrast, f_saturation, d), applied in the order `order` [4] int32 (a permutation).

    x: [H, W, 3] float32 -> same. Four 4-way switches: measured faster in tf.data than one
    24-way switch over the permutations (branches cost in proportion to their size) and than
    branch-free formulations (which compute every op). Ops of strength 0 are the identity.
    """
    T = tf()
    ops = [(adjust_brightness, view.brightness), (adjust_contrast, view.contrast),
           (adjust_saturation, view.saturation), (adjust_hue, view.hue)]
    for step in range(4):
        branches = [_bind(fn if strength else None, x, f)
                    for (fn, strength), f in zip(ops, factors)]
        x = T.switch_case(order[step], branches)
    return x


def _bind(fn, x, f):
    """A zero-argument branch computing fn(x, f), or returning x when fn is None."""
    return (lambda: x) if fn is None else (lambda: fn(x, f))


def _jitter_factors(u, view: recipes.ViewRecipe):
    """u: [4] uniforms in [0, 1) -> [4] float32 (f_brightness, f_contrast, f_saturation, d)."""
    T = tf()
    lo = [max(0.0, 1.0 - view.brightness), max(0.0, 1.0 - view.contrast),
          max(0.0, 1.0 - view.saturation), -view.hue]
    hi = [1.0 + view.brightness, 1.0 + view.contrast, 1.0 + view.saturation, view.hue]
    lo, hi = T.constant(lo, T.float32), T.constant(hi, T.float32)
    return lo + (hi - lo) * u


def _maybe(u, p: float, fn, x):
    """fn(x) with probability p (u: scalar uniform). p is static: 0 and 1 need no branch."""
    T = tf()
    if p <= 0:
        return x
    if p >= 1:
        return fn(x)
    # A branch (not a select) so the skipped op costs nothing.
    return T.cond(u < p, lambda: fn(x), lambda: x)


# ----------------------------------------------------------------------------- views

def augment_view(image, seed, view: recipes.ViewRecipe, out_size: int, ops, mean, std):
    """One augmented view of one image.

    image: [H, W, 3] uint8, any (dynamic) H, W. seed: [2] int32/int64. view: the ViewRecipe.
    ops: subset of ("crop", "flip", "colour", "blur", "solarize"), the ops that run here.
    mean, std: per-channel statistics, 3 Python floats each (they become constants), on the
    [0, 1] scale.
    Returns float32 [out_size, out_size, 3] normalised as (x - mean) / std when any of
    "colour", "blur", "solarize" runs here; otherwise ("split" / "device" modes, the device does
    the rest) uint8 [out_size, out_size, 3], the resized crop rounded. Without "crop" the whole
    image is resized to out_size.
    """
    return _views(image, seed, (view,), out_size, ops, mean, std)[0]


def two_views(image, seed, recipe: recipes.Recipe, out_size: int, mode: str, mean, std):
    """(view1, view2) of one image for `mode` in ("host", "split"); see `augment_view`.

    image: [H, W, 3] uint8; seed: [2] int32/int64. Each view: float32 [out_size, out_size, 3]
    (host) or uint8 (split), drawn from its own independent part of the seed's stream.
    """
    if mode not in ("host", "split"):
        raise ValueError(f"two_views runs on the host for modes 'host' and 'split', not {mode!r}")
    return _views(image, seed, (recipe.view1, recipe.view2), out_size, recipes.HOST_OPS[mode],
                  mean, std)


def two_views_encoded(data, seed, recipe: recipes.Recipe, out_size: int, mode: str, mean, std):
    """`two_views` of an encoded image: data, a scalar string of JPEG or PNG bytes (RGB or
    grayscale, as `jaxssl prepare` stores them). Equal to two_views(decoded image, ...), but a
    JPEG decodes only the union of the two crops (`decode_window`)."""
    if mode not in ("host", "split"):
        raise ValueError(f"two_views runs on the host for modes 'host' and 'split', not {mode!r}")
    return _views(data, seed, (recipe.view1, recipe.view2), out_size, recipes.HOST_OPS[mode],
                  mean, std, encoded=True)


def _is_jpeg(data):
    T = tf()
    return T.equal(T.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def image_shape(data):
    """(height, width), int32 [2], of JPEG or PNG bytes, read from the header alone."""
    T = tf()

    def png():  # the IHDR chunk: width then height, big-endian, at bytes 16-23
        return T.reverse(T.reshape(T.io.decode_raw(T.strings.substr(data, 16, 8), T.int32,
                                                   little_endian=False), [2]), [0])

    hw = T.cond(_is_jpeg(data), lambda: T.io.extract_jpeg_shape(data)[:2], png)
    return T.reshape(T.cast(hw, T.int32), [2])


def decode_window(data, start, size):
    """Pixels [y0:y0+h, x0:x0+w] (start = (y0, x0), size = (h, w), int32 [2]) of the JPEG or
    PNG in `data`, as uint8 [h, w, 3] RGB (grayscale repeated). A JPEG decodes only the window
    (tf.image.decode_and_crop_jpeg) and its pixels equal those of decoding it whole (with
    Pillow, or TensorFlow's INTEGER_ACCURATE DCT); a PNG is decoded whole, then cropped."""
    T = tf()
    start, size = T.cast(start, T.int32), T.cast(size, T.int32)

    def jpeg():
        # libjpeg upsamples chroma from neighbouring pixels, which a window's edge lacks (its
        # last column came out up to 33 levels off): decode a window grown to whole 16-pixel
        # blocks plus one block each side, then cut. ISLOW, the DCT Pillow uses: the pixels
        # equal Pillow's, so training (here) and evaluation (Pillow) see the same image.
        hw = T.io.extract_jpeg_shape(data)[:2]
        lo = T.maximum(start // 16 * 16 - 16, 0)
        hi = T.minimum((start + size + 15) // 16 * 16 + 16, hw)
        window = T.image.decode_and_crop_jpeg(data, T.concat([lo, hi - lo], 0), channels=3,
                                              dct_method="INTEGER_ACCURATE")
        return T.slice(window, T.concat([start - lo, [0]], 0), T.concat([size, [-1]], 0))

    def png():
        image = T.io.decode_png(data, channels=3)
        return T.slice(image, T.concat([start, [0]], 0), T.concat([size, [-1]], 0))

    return T.ensure_shape(T.cond(_is_jpeg(data), jpeg, png), [None, None, 3])


def decode_resized(data, size: int, crop_fraction: float = 1.0):
    """The image in `data` (JPEG or PNG bytes) resized so its shorter side is
    size / crop_fraction (bilinear, antialiased) and centre-cropped to uint8 [size, size, 3]:
    the fixed-size images a device-augmented run from records gets."""
    T = tf()
    hw = image_shape(data)
    short = max(size, round(size / crop_fraction))
    scale = T.cast(short, T.float32) / T.cast(T.reduce_min(hw), T.float32)
    new = T.maximum(T.cast(T.round(T.cast(hw, T.float32) * scale), T.int32), short)
    image = decode_window(data, T.zeros([2], T.int32), hw)
    image = T.image.resize(image, new, method="bilinear", antialias=True)
    top = (new - size) // 2
    image = T.slice(image, T.concat([top, [0]], 0), [size, size, 3])
    return T.ensure_shape(T.saturate_cast(T.round(image), T.uint8), [size, size, 3])


def _views(image, seed, views, out_size: int, ops, mean, std, encoded: bool = False):
    """One view of `image` per ViewRecipe in `views`, from one stateless draw [V, _VIEW_DRAWS]:
    row i, a disjoint range of Philox counters of `seed`, is view i's randomness. encoded:
    `image` is a scalar string of JPEG or PNG bytes (`two_views_encoded`)."""
    T = tf()
    u = T.random.stateless_uniform([len(views), _VIEW_DRAWS], _as_seed(seed), dtype=T.float64)
    u_crop, u = T.split(u, [_CROP_DRAWS, _VIEW_DRAWS - _CROP_DRAWS], axis=1)
    # float32 rounding may turn a draw into exactly 1.0: harmless, every use below is u < p
    # (false, as for any u >= p) or floor(u n) clipped to n - 1.
    u = T.unstack(T.reshape(T.cast(u, T.float32), [-1]))
    slots = _VIEW_DRAWS - _CROP_DRAWS

    image = T.convert_to_tensor(image)
    hw = image_shape(image) if encoded else T.shape(image)[:2]
    if "crop" not in ops:
        boxes = [(T.zeros([2], T.int32), hw)] * len(views)
    elif len({(v.crop_scale, v.crop_ratio) for v in views}) == 1:  # all crops in one go
        starts, sizes = _crop_box(u_crop, hw, views[0].crop_scale, views[0].crop_ratio)
        boxes = list(zip(T.unstack(starts), T.unstack(sizes)))
    else:
        boxes = [tuple(b[0] for b in _crop_box(u_crop[i:i + 1], hw, v.crop_scale, v.crop_ratio))
                 for i, v in enumerate(views)]
    if encoded:
        # Decode only the union of the views' crops (a JPEG skips the blocks outside it), then
        # cut each crop from it: the same pixels as decoding all and cropping.
        lo = T.reduce_min(T.stack([b[0] for b in boxes]), axis=0)
        hi = T.reduce_max(T.stack([b[0] + b[1] for b in boxes]), axis=0)
        image = decode_window(image, lo, hi - lo)
        boxes = [(start - lo, size) for start, size in boxes]
    return [_view(image, box, u[i * slots:(i + 1) * slots], view, out_size, ops, mean, std)
            for i, (view, box) in enumerate(zip(views, boxes))]


def _view(image, box, u, view: recipes.ViewRecipe, out_size: int, ops, mean, std):
    """augment_view with the crop box (start, size) [2] int32 each and u, the view's uniforms
    (float32 scalars indexed by the slots _FLIP, ...)."""
    T = tf()
    x = _crop_resize(image, box[0], box[1], out_size, out_size)  # float32, 0..255
    if "flip" in ops:
        x = _maybe(u[_FLIP], view.flip_prob, flip, x)
    if not {"colour", "blur", "solarize"} & set(ops):
        return T.ensure_shape(T.saturate_cast(T.round(x), T.uint8), [out_size, out_size, 3])

    x = x * (1.0 / 255.0)
    if "colour" in ops and any((view.brightness, view.contrast, view.saturation, view.hue)):
        factors = _jitter_factors(T.stack(u[_FACTORS:_FACTORS + 4]), view)
        n = len(_ORDERS)  # a uniformly random order: entry floor(u n) of the 24 permutations
        order = T.gather(T.constant(_ORDERS), T.minimum(T.cast(u[_ORDER] * n, T.int32), n - 1))
        x = _maybe(u[_JITTER], view.jitter_prob,
                   lambda x: _jitter(x, view, T.unstack(factors), order), x)
    if "colour" in ops:
        x = _maybe(u[_GRAY], view.grayscale_prob, to_grayscale, x)
    k = recipes.blur_kernel_size(out_size, view)
    if "blur" in ops and k:
        lo, hi = view.blur_sigma
        sigma = lo + (hi - lo) * u[_SIGMA]
        x = _maybe(u[_BLUR], view.blur_prob, lambda x: gaussian_blur(x, sigma, k), x)
    if "solarize" in ops:
        x = _maybe(u[_SOLARIZE], view.solarize_prob, solarize, x)
    # (x - mean) / std as x * scale + shift with image-sized constants: TF's CPU kernels for a
    # [H, W, 3] by [3] broadcast run ~8x slower than same-shape elementwise ops.
    scale = 1.0 / np.asarray(std, np.float32)
    shift = -np.asarray(mean, np.float32) * scale
    full = (out_size, out_size, 3)
    x = x * T.constant(np.broadcast_to(scale, full)) + T.constant(np.broadcast_to(shift, full))
    return T.ensure_shape(x, list(full))


def _as_seed(seed):
    """A [2] int32/int64 seed tensor from a tensor or a pair of Python ints."""
    T = tf()
    seed = T.convert_to_tensor(seed)
    if seed.dtype not in (T.int32, T.int64):
        seed = T.cast(seed, T.int64)
    return seed

