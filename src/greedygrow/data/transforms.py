"""Image transforms for real data: any PIL image → float tensor [3, R, R] in [−1, 1].

`prepare_image` is the whole pipeline: JPEG draft decoding at a reduced scale when the image is
much larger than needed, EXIF orientation, conversion of any mode to RGB (alpha composited on
white, 16-bit scaled to 8-bit), resize of the shorter side to R with an antialiased filter, a
random (training) or centred (evaluation) R×R crop, and scaling to [−1, 1]. The resize and crop
are one `Image.resize(box=...)` call, so only the pixels that end up in the crop are resampled.
Small images are upscaled; use a native-size filter to exclude them.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when reducing (support scales with the factor)
REDUCING_GAP = 3.0  # box-reduce first when shrinking by ≥ 3×; Pillow: indistinguishable result


def native_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, at full resolution.

    Call before `prepare_image` (which may decode at a reduced scale). Header-only for JPEG and
    WebP; a PNG whose EXIF comes after its pixel data is decoded. The shorter side needs no
    orientation: `min(img.size)` is the cheap native-size test.
    """
    w, h = img.size
    orientation = img.getexif().get(ImageOps.ExifTags.Base.Orientation, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha and palette transparency composited on white,
    16-bit greyscale scaled to 8 bits (32-bit integer "I" is read as 16-bit, values above
    65535 saturate), CMYK/YCbCr/LAB converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG opens as I;16 or I): v8 = v16 / 257 maps 65535 → 255 exactly
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        # float greyscale: values in [0, 1] are scaled by 255, larger ranges are clipped to 255
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if (img.mode == "P" and "transparency" in img.info) or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        # out = α·fg + (1 − α)·white  (alpha compositing, Porter & Duff 1984)
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def _resized_extent(w: int, h: int, resolution: int) -> tuple[int, int]:
    """Size after scaling the shorter side of (w, h) to `resolution` (longer side ≥ resolution)."""
    s = resolution / min(w, h)  # s = R / min(w, h)
    return max(resolution, round(w * s)), max(resolution, round(h * s))


def crop_box(
    size: tuple[int, int], resolution: int, train: bool, rng: random.Random | None = None
) -> tuple[float, float, float, float]:
    """Source-pixel box that, resized to R×R, equals resize-shorter-side-to-R then R×R crop.

    Training crops at a uniformly random integer offset of the resized image (drawn from `rng`,
    or Python's `random` module when None); evaluation crops the centre.
    """
    w, h = size
    rw, rh = _resized_extent(w, h, resolution)
    if train:
        r = rng if rng is not None else random
        x0, y0 = r.randint(0, rw - resolution), r.randint(0, rh - resolution)
    else:
        x0, y0 = (rw - resolution) // 2, (rh - resolution) // 2
    sx, sy = w / rw, h / rh  # source pixels per resized pixel, per axis
    return x0 * sx, y0 * sy, (x0 + resolution) * sx, (y0 + resolution) * sy


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image → float32 [3, H, W]; x = p / 127.5 − 1 maps [0, 255] to [−1, 1]."""
    a = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    out = np.empty(a.shape, dtype=np.float32)  # numpy, not torch ops: single-threaded by design
    np.divide(a, np.float32(127.5), out=out)
    out -= 1.0
    return torch.from_numpy(out)


def prepare_image(
    img: Image.Image, resolution: int, train: bool, rng: random.Random | None = None
) -> torch.Tensor:
    """Opened (lazy) PIL image → float tensor [3, R, R] in [−1, 1] (see module docstring).

    Raises whatever Pillow raises for undecodable data (OSError for truncated files, …);
    callers count and skip those.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        w, h = img.size
        s = resolution / min(w, h)
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale while every side stays ≥ the request
        img.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
    ImageOps.exif_transpose(img, in_place=True)  # decodes; no copy when there is no EXIF
    img = to_rgb(img)
    box = crop_box(img.size, resolution, train, rng)
    img = img.resize((resolution, resolution), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return to_tensor(img)
