"""Independent float64 numpy references of each augmentation op, with explicit parameters.

Images are float64 [H, W, 3] in [0, 1]. The definitions are those of jaxssl/data/recipes.py.
"""

import colorsys

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])


def crop_resize(img, y0, x0, h, w, out_h, out_w):
    """Crop [y0:y0+h, x0:x0+w], then bilinear resize with half-pixel centres, edges clamped."""
    crop = np.asarray(img, np.float64)[y0:y0 + h, x0:x0 + w]
    out = np.zeros((out_h, out_w, crop.shape[2]))
    for i in range(out_h):
        y = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        ya, yb = int(np.floor(y)), min(int(np.floor(y)) + 1, h - 1)
        for j in range(out_w):
            x = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            xa, xb = int(np.floor(x)), min(int(np.floor(x)) + 1, w - 1)
            fy, fx = y - ya, x - xa
            out[i, j] = ((1 - fy) * (1 - fx) * crop[ya, xa] + (1 - fy) * fx * crop[ya, xb]
                         + fy * (1 - fx) * crop[yb, xa] + fy * fx * crop[yb, xb])
    return out


def flip(img):
    return np.asarray(img)[:, ::-1]


def luma(img):
    return np.asarray(img, np.float64) @ LUMA


def brightness(img, f):
    return np.clip(img * f, 0, 1)


def contrast(img, f):
    m = luma(img).mean()
    return np.clip((img - m) * f + m, 0, 1)


def saturation(img, f):
    g = luma(img)[..., None]
    return np.clip((img - g) * f + g, 0, 1)


def hue(img, d):
    out = np.empty_like(np.asarray(img, np.float64))
    for idx in np.ndindex(img.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*img[idx])
        out[idx] = colorsys.hsv_to_rgb((h + d) % 1.0, s, v)
    return np.clip(out, 0, 1)


def grayscale(img):
    return np.repeat(luma(img)[..., None], 3, axis=-1)


def blur(img, sigma, k):
    r = (k - 1) // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    rows = sum(g[i] * padded[i:i + h, :] for i in range(k))  # vertical pass
    return sum(g[j] * rows[:, j:j + w] for j in range(k))  # horizontal pass


def solarize(img, threshold=0.5):
    return np.where(img >= threshold, 1.0 - img, img)


def normalise(img, mean, std):
    return (img - np.asarray(mean)) / np.asarray(std)
