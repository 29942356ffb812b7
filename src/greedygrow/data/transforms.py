"""Image transforms for real data: any PIL image → float tensor [3, R, R] in [−1, 1]."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when reducing (support scales with the factor)
REDUCING_GAP = 3.0  # box-reduce first when shrinking by ≥ 3×; Pillow: indistinguishable result


def native_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, at full size: call before `prepare_image` may draft."""
    w, h = img.size
    orientation = img.getexif().get(ImageOps.ExifTags.Base.Orientation, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency on white, 16-bit and float greyscale scaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0  # 16-bit greyscale: v8 = v16 / 257 maps 65535 → 255 exactly
        elif a.size and a.max() <= 1.0:
            a = a * 255.0  # float greyscale in [0, 1]; larger ranges are clipped to 255
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(
    size: tuple[int, int], resolution: int, train: bool, rng: random.Random | None = None
) -> tuple[float, float, float, float]:
    """Source box equal to shorter side → R then an R×R crop: random if `train`, else centred."""
    w, h = size
    s = resolution / min(w, h)  # the shorter side scaled to R; the longer side stays ≥ R
    rw, rh = max(resolution, round(w * s)), max(resolution, round(h * s))
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


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float32 on their device, the same values as `to_tensor`."""
    divisor = torch.full((), 127.5, device=pixels.device)  # a tensor: CUDA divides, no 1/x
    return pixels.to(torch.float32).div_(divisor).sub_(1.0)


def prepare_image(
    img: Image.Image, resolution: int, train: bool, rng: random.Random | None = None
) -> torch.Tensor:
    """Opened (lazy) PIL image → tensor [3, R, R] in [−1, 1] (docs/data.md); Pillow may raise."""
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
