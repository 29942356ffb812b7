"""Drawing a `scenes.Scene`: the palette, and shapes anti-aliased by SDF area coverage."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from greedygrow.data.transforms import RESAMPLE  # resize as real images are resized

if TYPE_CHECKING:
    from greedygrow.data.scenes import Background, Scene

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (215, 38, 38),
    "orange": (242, 136, 18),
    "yellow": (236, 200, 16),
    "green": (36, 158, 64),
    "blue": (36, 88, 212),
    "purple": (136, 56, 184),
    "black": (28, 28, 28),
}
# Light, low-saturation backgrounds, far from every object colour and its tint.
BACKGROUNDS: dict[str, RGB] = {
    "white": (248, 248, 246),
    "light grey": (220, 220, 220),
    "cream": (244, 237, 220),
    "pale blue": (224, 233, 243),
    "pale green": (228, 240, 226),
}
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096

# Detail, as fractions of the image side.
TINT = 0.4  # tint = (1 − TINT) · colour + TINT · white: the light half of a detail pattern
STRIPE_PERIOD = 0.024
DOT_SPACING = 0.03
DOT_RADIUS = 0.009
OUTLINE_WIDTH = 0.012
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
_STAR_HALF_WIDTH = math.cos(math.radians(18))  # x extent of a unit star: ±cos 18°
_STAR_HEIGHT = 1.0 + math.cos(math.radians(36))  # y extent: from −1 (top tip) to cos 36°


def check_resolution(resolution: int) -> None:
    """Clear error for an image side outside [MIN_RESOLUTION, MAX_RESOLUTION]."""
    ok = isinstance(resolution, (int, np.integer))
    if not ok or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"scenes resolution must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] px, "
            f"got {resolution!r}"
        )


def shape_box(shape: str, cell: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """Tight box of `shape` drawn in the square cell (x, y, side); rendering uses only this."""
    x, y, s = cell
    if shape != "star":
        return (x, y, x + s, y + s)
    h = s / (2 * _STAR_HALF_WIDTH) * _STAR_HEIGHT
    top = y + (s - h) / 2
    return (x, top, x + s, top + h)


def _coverage(d: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - d, 0.0, 1.0)  # α = clip(½ − d, 0, 1): box-filtered edge coverage


def _polygon_sdf(verts: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from pixel centres to a polygon (even-odd rule)."""
    d2 = None
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    pts = [(float(x), float(y)) for x, y in verts]  # Python floats keep the arrays float32
    for i in range(len(pts)):
        ax, ay = pts[i]
        bx, by = pts[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = xs - ax, ys - ay
        t = np.clip((wx * ex + wy * ey) * (1.0 / (ex * ex + ey * ey)), 0.0, 1.0)
        qx, qy = wx - ex * t, wy - ey * t  # vector to the closest point on edge a→b
        e2 = qx * qx + qy * qy
        d2 = e2 if d2 is None else np.minimum(d2, e2)
        if ey != 0.0:
            crosses = (ys >= min(ay, by)) & (ys < max(ay, by))  # [h, 1]
            x_cross = ax + (ys - ay) * (ex / ey)
            inside ^= crosses & (xs < x_cross)
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d2)


def _shape_sdf(shape: str, box: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Signed distance in pixels of each pixel centre to the shape drawn in its tight box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        return np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - (x1 - x0) / 2
    if shape == "square":
        dx, dy = np.abs(xs - cx) - (x1 - x0) / 2, np.abs(ys - cy) - (y1 - y0) / 2
        outside = np.sqrt(np.maximum(dx, 0.0) ** 2 + np.maximum(dy, 0.0) ** 2)
        return outside + np.minimum(np.maximum(dx, dy), 0.0)  # box SDF (Quilez)
    if shape == "triangle":
        return _polygon_sdf(np.array([[cx, y0], [x1, y1], [x0, y1]]), xs, ys)
    radius = (x1 - x0) / (2 * _STAR_HALF_WIDTH)  # star: ten vertices, tips at `radius`
    k = np.arange(10)
    r = np.where(k % 2 == 0, radius, radius * STAR_INNER)
    theta = np.deg2rad(-90.0 + 36.0 * k)
    verts = np.stack([cx + r * np.cos(theta), y0 + radius + r * np.sin(theta)], axis=1)
    return _polygon_sdf(verts, xs, ys)


def _tint_weight(attribute: str, d, alpha, xs, ys, cx: float, cy: float, n: int):
    """Per-pixel coverage of the tint (the rest of `alpha` is the full colour); 0 when plain."""
    if attribute == "plain":
        return 0.0
    if attribute == "outlined":
        # interior (the shape inset by the outline width) in tint; the ring α − inner in colour
        return _coverage(d + OUTLINE_WIDTH * n)
    if attribute == "striped":
        period, mean = STRIPE_PERIOD * n, 0.5
    else:  # dotted
        period, radius = DOT_SPACING * n, DOT_RADIUS * n
        mean = math.pi * radius * radius / (period * period)  # dot area / cell area
    # contrast kept at this period: patterns under 2 px average out (box filter) to their mean
    f = min(max(period - 2.0, 0.0), 1.0)
    if f == 0.0:
        return alpha * mean
    if attribute == "striped":
        u = ((xs - cx) + (ys - cy)) * math.sqrt(0.5)  # distance along the stripes' normal
        pattern = _coverage(np.abs(np.mod(u, period) - period / 2) - period / 4)
    else:
        dx = np.mod(xs - cx, period) - period / 2
        dy = np.mod(ys - cy, period) - period / 2
        pattern = _coverage(np.sqrt(dx * dx + dy * dy) - radius)
    return alpha * (mean + f * (pattern - mean))  # unresolvable detail fades to its mean


def _background(bg: Background, n: int) -> np.ndarray:
    """The background as planar uint8 [3, n, n] (planar keeps every loop contiguous)."""
    canvas = np.empty((3, n, n), dtype=np.uint8)
    if bg.kind == "plain" or bg.color == bg.color2:
        canvas[:] = np.array(bg.color, dtype=np.uint8)[:, None, None]
        return canvas
    if bg.kind != "gradient":
        raise ValueError(f"unknown background kind {bg.kind!r}; expected 'plain' or 'gradient'")
    a = math.radians(bg.angle)
    ca, sa = math.cos(a), math.sin(a)
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    # g = ½ + (x cos a + y sin a) / (|cos a| + |sin a|) ∈ [0, 1] over the image
    g = (coords[None, :] * ca + coords[:, None] * sa) * (1.0 / (abs(ca) + abs(sa))) + 0.5
    c1, c2 = (np.array(c, dtype=np.float32)[:, None, None] for c in (bg.color, bg.color2))
    canvas[:] = g * (c2 - c1) + (c1 + 0.5)  # c = c1 + g (c2 − c1), rounded
    return canvas


def render(scene: Scene, resolution: int | None = None) -> Image.Image:
    """The scene drawn directly (crisp, anti-aliased) at `resolution`² px; default native."""
    n = scene.native_resolution if resolution is None else resolution
    check_resolution(n)
    canvas = _background(scene.background, n)
    for obj in scene.objects:
        box = np.asarray(obj.box, dtype=np.float64) * n
        c0, r0 = max(math.floor(box[0]) - 1, 0), max(math.floor(box[1]) - 1, 0)
        c1, r1 = min(math.ceil(box[2]) + 1, n), min(math.ceil(box[3]) + 1, n)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]  # pixel centres
        ys = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
        d = _shape_sdf(obj.shape, box, xs, ys).astype(np.float32, copy=False)
        alpha = _coverage(d)
        cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
        a_tint = _tint_weight(obj.attribute, d, alpha, xs, ys, cx, cy, n)
        region = canvas[:, r0:r1, c0:c1].astype(np.float32)
        # over operator with two inks: C = B (1 − α) + c α_c + t α_t, with α = α_c + α_t
        region *= 1.0 - alpha
        for k, c in enumerate(COLORS[obj.color]):
            t = (1.0 - TINT) * c + TINT * 255.0  # t = (1 − τ) c + τ white
            region[k] += (alpha - a_tint) * c + a_tint * t
        region += 0.5
        canvas[:, r0:r1, c0:c1] = region  # convex mix of values in [0, 255]: no clipping needed
    return Image.merge("RGB", [Image.fromarray(plane) for plane in canvas])


def render_native(
    scene: Scene, resolution: int | None = None, oversample: int | None = 4
) -> Image.Image:
    """A data set's image: drawn at native size (at most `oversample`·R), resized as real data."""
    n = scene.native_resolution
    if resolution is None or resolution == n:
        return render(scene, n)
    check_resolution(resolution)
    if oversample is not None and n > oversample * resolution:
        n = oversample * resolution
    return render(scene, n).resize((resolution, resolution), RESAMPLE)
