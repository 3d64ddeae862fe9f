"""Augmentation recipes: the parameters of each two-view recipe, shared by the host (TensorFlow)
and device (JAX) implementations. No TensorFlow or JAX here.

The ops, on float images in [0, 1] (both implementations follow exactly these definitions):

- crop: random resized crop (torchvision's rule). Area A = a H W with a ~ U(scale), aspect
  ratio r = exp(U(log ratio)); w = round(sqrt(A r)), h = round(sqrt(A / r)); the first of 10
  tries with 0 < h <= H and 0 < w <= W wins, else a centred crop of the whole image clipped to
  the ratio range. Offsets y0 ~ randint(0, H - h + 1), x0 likewise. The crop is resampled to
  the output size by bilinear interpolation with half-pixel centres: output row i samples
  y = y0 + (i + 0.5) h / out_h - 0.5, clamped to [y0, y0 + h - 1] (exactly crop, then
  resize without antialiasing).
- flip: horizontal, with probability flip_prob.
- brightness:  x * f,                         f ~ U(max(0, 1 - b), 1 + b)
- contrast:    (x - m) * f + m, m = mean of the image's luma,  f ~ U(max(0, 1 - c), 1 + c)
- saturation:  (x - g) * f + g, g = per-pixel luma,           f ~ U(max(0, 1 - s), 1 + s)
- hue:         RGB -> HSV, h <- (h + d) mod 1, HSV -> RGB,      d ~ U(-hue, hue)
  Each jitter op clips to [0, 1]; with probability jitter_prob the four run, in a uniformly
  random order (SimCLR); luma = 0.299 R + 0.587 G + 0.114 B (ITU-R 601, as Pillow and
  torchvision).
- grayscale: every channel <- luma, with probability grayscale_prob.
- blur: separable Gaussian on the output view, sigma ~ U(blur_sigma), kernel side
  k = 2 floor(fraction * side / 2) + 1 (23 at 224 px, as SimCLR), weights exp(-t^2 / 2 sigma^2)
  for t in [-(k-1)/2, (k-1)/2] normalised to sum 1, reflect padding (d c b | a b c d), with
  probability blur_prob.
  Off for images of side <= blur_min_side (SimCLR does not blur CIFAR).
- solarize: x <- 1 - x where x >= 0.5, with probability solarize_prob.
- normalise: (x - mean) / std with the dataset's per-channel statistics.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ViewRecipe", "Recipe", "RECIPES", "get_recipe", "blur_kernel_size", "LUMA",
           "HOST_OPS", "DEVICE_OPS"]

LUMA = (0.299, 0.587, 0.114)


def blur_kernel_size(side: int, recipe: "ViewRecipe") -> int:
    """Kernel side for a view of `side` pixels; 0 means no blur at this size."""
    if side <= recipe.blur_min_side or recipe.blur_prob <= 0:
        return 0
    return max(3, 2 * int(recipe.blur_kernel_fraction * side / 2) + 1)


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
    """How one view is drawn. Probabilities in [0, 1]; ranges as (low, high)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    blur_min_side: int = 32
    solarize_prob: float = 0.0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A two-view recipe: view1 and view2 (equal unless the recipe is asymmetric, as BYOL's)."""

    name: str
    view1: ViewRecipe
    view2: ViewRecipe


def _simclr(strength: float) -> ViewRecipe:
    s = strength
    return ViewRecipe(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)


def simclr(strength: float = 1.0) -> Recipe:
    """SimCLR: colour strength s = 1.0 on ImageNet, 0.5 on CIFAR; blur p 0.5 (off at 32 px)."""
    v = _simclr(strength)
    return Recipe("simclr", v, v)


def mocov2() -> Recipe:
    """MoCo v2: crop scale (0.2, 1); jitter 0.4/0.4/0.4/0.1 p 0.8; grayscale 0.2; blur 0.5."""
    v = ViewRecipe(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    return Recipe("mocov2", v, v)


def byol() -> Recipe:
    """BYOL: asymmetric views, blur 1.0 / 0.1 and solarize 0.0 / 0.2; jitter 0.4/0.4/0.2/0.1."""
    base = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    return Recipe(
        "byol",
        ViewRecipe(**base, blur_prob=1.0, solarize_prob=0.0),
        ViewRecipe(**base, blur_prob=0.1, solarize_prob=0.2),
    )


RECIPES = {
    "simclr": simclr,
    "simclr_cifar": lambda: dataclasses.replace(simclr(0.5), name="simclr_cifar"),
    "mocov2": mocov2,
    "byol": byol,
}

# Where each op runs in each augmentation mode ("split": geometry on the host, colour on device).
HOST_OPS = {"host": ("crop", "flip", "colour", "blur", "solarize"), "split": ("crop", "flip"),
            "device": ()}
DEVICE_OPS = {"host": (), "split": ("colour", "blur", "solarize"),
              "device": ("crop", "flip", "colour", "blur", "solarize")}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()
