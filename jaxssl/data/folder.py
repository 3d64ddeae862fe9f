"""Image files decoded with Pillow, and `load_folder`: any directory tree of images as a Source.

Every decoder here returns uint8 [H, W, 3] RGB, whatever the file holds: grayscale, RGBA and
palette images, CMYK JPEGs and 16-bit PNGs included. Pillow releases the GIL while it decodes,
so `parallel_map` spreads decoding over a pool of threads.

Image folders come from anywhere, so a file is read only as the format its extension names (a
PostScript file called `a.png` never reaches Ghostscript), its size is checked from its header
against `MAX_PIXELS` before any pixel is decoded, and at most `DECODE_THREADS` decodes run at
once by default, so the memory a hostile file can take is bounded whatever the core count.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps

from jaxssl import JaxsslWarning

if TYPE_CHECKING:
    from jaxssl.data.sources import Source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The Pillow formats each extension may hold; Image.open tries no other, so a file named .png
# that holds EPS (Ghostscript), or any other of Pillow's ~40 formats, is a bad file rather than
# decoded. The JPEG opener also returns the MPO (multi-picture) JPEGs cameras write: MPO has no
# opener of its own. Extensions not listed here (passed to load_folder) take the one format
# Pillow registers for them.
IMAGE_FORMATS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",),
                 ".bmp": ("BMP",), ".gif": ("GIF",), ".webp": ("WEBP",)}
# Images larger than this (width x height, read from the header) are bad files, never decoded.
# 8192 x 8192: ImageNet's largest images are well below 20 MP and a 50 MP camera photo fits,
# while a decode stays under about 200 MB of RGB (x DECODE_THREADS at once). A 164 KB PNG can
# be 13000 x 13000 (507 MB decoded), which Pillow alone decodes with a warning: it refuses only
# above 2 x PIL.Image.MAX_IMAGE_PIXELS (179 MP), and that limit is global, so it is left alone.
MAX_PIXELS = 8192 * 8192
# Decoding threads by default, whatever the core count: each may hold a MAX_PIXELS image and its
# conversions, so peak memory must not grow with a 64-core machine's cpu_count.
DECODE_THREADS = 8
# Tasks submitted per thread ahead of the consumer: enough to keep every thread busy while the
# oldest result is awaited, few enough that finished results waiting their turn stay bounded.
_AHEAD_PER_THREAD = 2
# Images whose mean/std are measured; decoding all of a large folder twice would double load time.
STATS_SAMPLE = 500
# Pixels per image that enter the mean/std; a photo is strided down to about this many.
_STATS_PIXELS_PER_IMAGE = 1 << 16

_T = TypeVar("_T")
_R = TypeVar("_R")


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], *,
                 num_threads: int | None = None) -> Iterator[_R]:
    """Yields `fn(item)` for every item, in order, computed on a pool of threads.

    `num_threads` threads (default: cpu_count + 4, at most DECODE_THREADS) run `fn`, and at most
    2 tasks per thread are submitted and not yet yielded, so a caller that stops early (a strict
    load meeting a bad file) does not wait for the rest, a million files do not make a million
    futures at once, and memory stays bounded on any number of cores.
    """
    workers = num_threads or min(DECODE_THREADS, (os.cpu_count() or 1) + 4)
    items = iter(items)
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="jaxssl-decode") as pool:
        in_flight = collections.deque(
            pool.submit(fn, x) for x in itertools.islice(items, _AHEAD_PER_THREAD * workers))
        while in_flight:
            yield in_flight.popleft().result()
            # Topped up only once the caller has taken that result and asks for the next: a
            # submission before the yield would make 2 * workers + 1 not yet taken.
            for x in itertools.islice(items, 1):
                in_flight.append(pool.submit(fn, x))


def _int_to_uint8(a: np.ndarray) -> np.ndarray:
    """Integer pixels -> uint8 by their range: 8-bit values kept, 16-bit ones shifted right by
    8 (so 65535 -> 255 rather than clipping everything above 255), anything wider min-max
    scaled."""
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (a >> 8).astype(np.uint8)
    return _rescale(a.astype(np.float64), lo, hi)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    """Float pixels -> uint8: [0, 1] scaled by 255, [0, 255] kept, other ranges min-max scaled."""
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return np.round(a * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(a).astype(np.uint8)
    return _rescale(a, lo, hi)


def _rescale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round((a - lo) * (255 / max(hi - lo, 1e-12))).astype(np.uint8)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> uint8 [H, W, 3] RGB.

    Alpha is dropped (not composited); palette images go through RGBA so transparent palettes
    convert cleanly; single-channel 16-bit, 32-bit integer and float images are scaled into
    0-255 by `_int_to_uint8` / `_float_to_uint8` rather than clipped, which is what Pillow's own
    conversion of them would do.
    """
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        gray = _float_to_uint8(a) if im.mode == "F" else _int_to_uint8(a.astype(np.int64))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "La":  # Pillow cannot convert premultiplied LA to RGB directly
        im = im.convert("LA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


class BadImageError(ValueError):
    """A file that is not the image format its extension names, or too large to decode.

    `reason` says why in one line, without the path; str() is "path: reason"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.reason = reason


def image_formats(extension: str) -> tuple[str, ...]:
    """The Pillow formats a file ending in `extension` (".png", any case) may be read as.
    ValueError when Pillow knows no format by that extension."""
    ext = extension.lower()
    if ext in IMAGE_FORMATS:
        return IMAGE_FORMATS[ext]
    registered = Image.registered_extensions()
    if ext not in registered:
        raise ValueError(f"Pillow knows no image format by the extension {extension!r}; pass "
                         f"extensions Pillow reads, e.g. {', '.join(IMAGE_EXTENSIONS)}")
    return (registered[ext],)


def _too_large(pixels: int, max_pixels: int, size: str = "") -> str:
    return (f"{size}{pixels:,} pixels, over the limit of {max_pixels:,} checked before decoding "
            f"(a decompression bomb?); to read it raise max_pixels (config: data.max_pixels)")


def _pillow_refused(e: Exception, max_pixels: int) -> str:
    """The reason for Pillow's own DecompressionBombError/Warning, raised by Image.open before
    our header check could run (over 2x, or under -W error 1x, PIL.Image.MAX_IMAGE_PIXELS)."""
    claimed = re.search(r"Image size \((\d+) pixels\)", str(e))
    if claimed is None:
        return f"over Pillow's pixel limit ({_one_line(e)})"
    pixels = int(claimed.group(1))
    if pixels > max_pixels:
        return _too_large(pixels, max_pixels)
    return (f"{pixels:,} pixels, within max_pixels but over Pillow's own limit (PIL.Image."
            f"MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}); to read it raise that as well")


def decode_opened(im: Image.Image, path: str | os.PathLike, max_pixels: int
                  ) -> tuple[np.ndarray, bool]:
    """An opened image's pixels as uint8 [H, W, 3] RGB, turned upright by its EXIF
    orientation, and whether it was turned: the rules of `decode_rgb`, which `jaxssl prepare`
    shares (records must decode to the same pixels). BadImageError (naming `path`) for an
    image over max_pixels, judged from its header before any pixel is decoded."""
    width, height = im.size
    if width * height > max_pixels:  # before load(): a bomb's pixels are never allocated
        raise BadImageError(path, _too_large(width * height, max_pixels,
                                             f"{width} x {height} = "))
    im.load()  # the full decode: a truncated file fails here, not on first use
    oriented = im.getexif().get(0x0112, 1) != 1  # 0x0112: EXIF orientation tag
    if oriented:
        im = ImageOps.exif_transpose(im)
    return pil_to_rgb(im), oriented


def decode_rgb(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Reads an image file as uint8 [H, W, 3] RGB (the first frame of an animation), turned
    upright by its EXIF orientation.

    Only the Pillow formats of the file's extension are tried (`image_formats`), and an image
    of more than `max_pixels` (default MAX_PIXELS) is refused from its header, before decoding:
    both raise BadImageError. Otherwise raises whatever Pillow raises for a bad file.
    """
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    ext = os.path.splitext(os.fspath(path))[1]
    formats = image_formats(ext)
    try:
        with Image.open(path, formats=formats) as im:
            return decode_opened(im, path, limit)[0]
    except Image.UnidentifiedImageError:
        # Pillow's message only repeats the path; it says nothing about what the file is, and
        # trying every other format to find out is exactly what this avoids.
        raise BadImageError(path, f"not a {formats[0]} file (its extension {ext} says so, but "
                                  f"Pillow cannot read its header as {' or '.join(formats)})"
                            ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, _pillow_refused(e, limit)) from None


def read_files(paths: Sequence[str], *, max_pixels: int | None = None) -> list[np.ndarray]:
    """Decodes files to uint8 [H, W, 3] RGB each, in order; several at once on threads.
    `max_pixels` as in `decode_rgb`."""
    decode = functools.partial(decode_rgb, max_pixels=max_pixels)
    if len(paths) < 4:
        return [decode(p) for p in paths]
    return list(parallel_map(decode, paths))


def pixel_histogram(image: np.ndarray) -> np.ndarray:
    """int64 [3, 256]: how often each value 0-255 occurs in each channel of uint8 [..., 3]."""
    flat = image.reshape(-1, 3).astype(np.intp) + np.arange(0, 768, 256)
    return np.bincount(flat.ravel(), minlength=768).reshape(3, 256)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _list_images(root: str, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Sorted paths (relative to root) of files with an image extension, and how many other
    files there are. Hidden files and folders (a leading dot) are left out."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(extensions):
                images.append(os.path.relpath(os.path.join(dirpath, name), root))
            else:
                others += 1
    return images, others


def _class_folders(root: str, rel_paths: list[str],
                   labelled: bool | str) -> tuple[str, ...] | None:
    """The sorted first-level subfolder names that label the images, or None if unlabelled."""
    if labelled not in (True, False, "auto"):
        raise ValueError(f"labelled must be True, False or 'auto', got {labelled!r}")
    if labelled is False:
        return None
    loose = [p for p in rel_paths if os.sep not in p]
    folders = tuple(sorted({p.split(os.sep, 1)[0] for p in rel_paths if os.sep in p}))
    if labelled == "auto":
        return folders if not loose and len(folders) >= 2 else None
    if loose:
        raise ValueError(f"labelled=True needs every image in a class subfolder of {root}, but "
                         f"'{loose[0]}' lies directly in it; move it into a subfolder or pass "
                         f"labelled=False")
    return folders


def load_folder(root: str | os.PathLike, *, labelled: bool | str = "auto", strict: bool = False,
                extensions: Sequence[str] = IMAGE_EXTENSIONS,
                max_pixels: int | None = None) -> Source:
    """Every image file under `root` (recursively) as a Source whose `read` decodes from disk.

    Args:
      root: a directory. Files are taken in sorted path order; hidden files and folders are
        ignored, as are files whose extension is not in `extensions` (case-insensitive).
      labelled: "auto" labels images by their first-level subfolder when every image lies in
        one and there are at least two; True requires that layout (one folder is then one
        class); False never labels.
      strict: False skips bad files (corrupt, truncated, not an image, not the format their
        extension names, over `max_pixels`) with one warning and records them in
        `Source.skipped`; True raises ValueError at the first one.
      extensions: the file name endings that count as images. Each is read only as the
        format(s) it names (`IMAGE_FORMATS`, else the one Pillow registers for it).
      max_pixels: width x height above which an image is a bad file, judged from its header
        before decoding (None: MAX_PIXELS, 8192 x 8192). `Source.read` applies it too. Above
        PIL.Image.MAX_IMAGE_PIXELS (89.5M) Pillow also warns, and above twice that refuses.

    Every file is opened and fully decoded once here (on threads), so training never meets a
    bad file. Images may differ in size; `read` returns uint8 [H, W, 3] RGB each. `mean`/`std`
    come from a deterministic sample of up to 500 images. Labels are int32 [N], indices into
    `class_names` (the sorted subfolder names).
    """
    from jaxssl.data import sources  # sources re-exports this loader, so it is imported here

    # ~ expanded as a shell would; absolute so paths stay valid if the working directory changes
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root} does not exist; pass the directory that "
                                f"holds your images")
    if not os.path.isdir(root):
        raise ValueError(f"{root} is a file, not a folder; pass the directory that holds your "
                         f"images")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive number of pixels (width x height), got "
                         f"{max_pixels!r}")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    for ext in exts:
        image_formats(ext)  # an extension Pillow has no format for is an error now, not per file
    rel_paths, others = _list_images(root, exts)
    if not rel_paths:
        what = f"holds {others} files but none ending in {', '.join(exts)}" if others else "is empty"
        raise ValueError(f"image folder {root} {what}; point root at a folder of images "
                         f"(subfolders are searched too)")
    class_names = _class_folders(root, rel_paths, labelled)

    rng = np.random.default_rng(0)
    sampled = set(rng.choice(len(rel_paths), min(len(rel_paths), STATS_SAMPLE), replace=False).tolist())

    def check(i: int) -> tuple[str | None, np.ndarray | None]:
        try:
            image = decode_rgb(os.path.join(root, rel_paths[i]), max_pixels=max_pixels)
        except BadImageError as e:
            return e.reason, None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... per format
            return _one_line(e), None
        if i not in sampled:
            return None, None
        stride = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / _STATS_PIXELS_PER_IMAGE)))
        return None, pixel_histogram(image[::stride, ::stride])

    kept, skipped, hist = [], [], np.zeros((3, 256), np.int64)
    for i, (reason, h) in enumerate(parallel_map(check, range(len(rel_paths)))):
        path = os.path.join(root, rel_paths[i])
        if reason is not None:
            if strict:
                raise ValueError(f"cannot read image {path} ({reason}); remove or fix it, or "
                                 f"pass strict=False to skip unreadable files")
            skipped.append((path, reason))
            continue
        kept.append(i)
        if h is not None:
            hist += h
    if not kept:
        raise ValueError(f"none of the {len(rel_paths)} image files under {root} could be read "
                         f"(first: {skipped[0][0]}: {skipped[0][1]}); check the files")
    if skipped:
        shown = ", ".join(f"{os.path.relpath(p, root)} ({r})" for p, r in skipped[:3])
        warnings.warn(f"load_folder skipped {len(skipped)} of {len(rel_paths)} image files under "
                      f"{root} that could not be read: {shown}{', ...' if len(skipped) > 3 else ''}"
                      f"; Source.skipped lists them all, strict=True makes this an error",
                      JaxsslWarning, stacklevel=2)

    labels = None
    if class_names is not None:
        index = {name: c for c, name in enumerate(class_names)}
        labels = np.array([index[rel_paths[i].split(os.sep, 1)[0]] for i in kept], np.int32)
    mean, std = sources.stats_from_histogram(hist)
    return sources.Source(
        name=f"folder:{root}", num_examples=len(kept), labels=labels, class_names=class_names,
        mean=mean, std=std, paths=tuple(os.path.join(root, rel_paths[i]) for i in kept),
        skipped=tuple(skipped), max_pixels=max_pixels)
