"""Scenes: procedural text–image pairs with ground truth, the embedded default data set.

A scene is 1–5 objects (colour, shape, attribute) laid out without overlap on a light
background, described by a caption made from templates, with a *native resolution* drawn from
a web-like distribution. Everything is a pure function of ``(seed, index)``.

Scenes are square: a native resolution N means an N×N image, so resizing the shorter side to R
and cropping (random or centre) keeps every object whole and every ground-truth box exact.
A data set image is the scene drawn at N and then resized to R like any real image
(`render_native`), so an image of small native size is blurry when upsampled and the
high-resolution-subset filter (`min_native`) behaves as it does on web data.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from greedygrow.data.split import rank_and_world

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
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
ATTRIBUTES: tuple[str, ...] = ("plain", "striped", "dotted", "outlined")
ATTRIBUTE_WEIGHTS: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
# (colour, shape) pairs that sample_scene never draws: evaluation prompts ask for them, to
# test composition beyond the combinations seen in training (ours; cf. DSG's held-out split).
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "star"), ("orange", "circle"), ("green", "triangle")}
)
# Light, low-saturation backgrounds, far from every object colour and its tint.
BACKGROUNDS: dict[str, RGB] = {
    "white": (248, 248, 246),
    "light grey": (220, 220, 220),
    "cream": (244, 237, 220),
    "pale blue": (224, 233, 243),
    "pale green": (228, 240, 226),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 5
MAX_GROUPS = 3
TEMPLATES: tuple[str, ...] = (
    "{objs}",
    "a picture with {objs}",
    "an image of {objs}",
    "a drawing of {objs}",
    "{objs} on a {bg} background",
    "there {be} {objs}",
    "a simple illustration of {objs}",
    "a flat graphic showing {objs}",
)

# Native resolution: log-uniform within octaves [lo, 2 lo) with these probabilities — most
# images below 128 px, a few percent at 512 px or more (a long-tailed, web-like mix; the
# 512 px subset is small, as the phase-2 filter expects).
NATIVE_OCTAVES: tuple[tuple[int, float], ...] = (
    (32, 0.30),
    (64, 0.38),
    (128, 0.20),
    (256, 0.085),
    (512, 0.035),
)
NATIVE_MIN, NATIVE_MAX = 32, 1024
MIN_RESOLUTION, MAX_RESOLUTION = 8, 4096
RESAMPLE = Image.Resampling.BICUBIC  # antialiased resize, as the real-data transforms use

# Geometry, as fractions of the image side.
EDGE_MARGIN = 0.03  # free border around the image
GAP = 0.04  # minimum free space between two objects' boxes
TINT = 0.4  # tint = (1 − TINT) · colour + TINT · white: the light half of a detail pattern
STRIPE_PERIOD = 0.024
DOT_SPACING = 0.03
DOT_RADIUS = 0.009
OUTLINE_WIDTH = 0.012
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
GROUND_TRUTH_VERSION = 1


@dataclass(frozen=True)
class Group:
    """A counted phrase of the caption: `count` identical (colour, shape, attribute) objects."""

    color: str
    shape: str
    attribute: str
    count: int


@dataclass(frozen=True)
class SceneObject:
    """One object; `box` = tight (x0, y0, x1, y1) in [0, 1] image fractions; `group` indexes
    `Scene.groups`."""

    color: str
    shape: str
    attribute: str
    box: tuple[float, float, float, float]
    group: int


@dataclass(frozen=True)
class Background:
    """Plain colour, or a linear gradient from `color` to `color2` along `angle` degrees."""

    kind: str
    name: str
    color: RGB
    color2: RGB
    angle: float


@dataclass(frozen=True)
class Scene:
    """A sampled scene: what to draw, its caption and its native resolution."""

    caption: str
    native_resolution: int
    background: Background
    groups: tuple[Group, ...]
    objects: tuple[SceneObject, ...]
    seed: int | None = None
    index: int | None = None

    @property
    def count(self) -> int:
        """Total number of objects."""
        return len(self.objects)

    def to_dict(self) -> dict[str, Any]:
        """The ground truth as plain JSON-able data (schema in CONTRACTS.md, plus extras)."""
        bg = self.background
        return {
            "version": GROUND_TRUTH_VERSION,
            "caption": self.caption,
            "native_resolution": self.native_resolution,
            "seed": self.seed,
            "index": self.index,
            "background": {
                "kind": bg.kind,
                "name": bg.name,
                "color": list(bg.color),
                "color2": list(bg.color2),
                "angle": bg.angle,
            },
            "groups": [
                {"color": g.color, "shape": g.shape, "attribute": g.attribute, "count": g.count}
                for g in self.groups
            ],
            "objects": [
                {
                    "color": o.color,
                    "shape": o.shape,
                    "attribute": o.attribute,
                    "box": list(o.box),
                    "group": o.group,
                }
                for o in self.objects
            ],
        }

    def to_json(self) -> str:
        """The ground truth as a JSON string (floats round-trip exactly)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`; also accepts the minimal schema without groups/group fields."""
        try:
            objects_raw = list(d["objects"])
            caption = str(d["caption"])
            native = int(d["native_resolution"])
            bg_raw = d.get("background") or {"kind": "plain", "name": "white"}
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"scene ground truth: missing or malformed field {e}; expected keys "
                "'caption', 'native_resolution', 'objects' (see CONTRACTS.md, data)"
            ) from None
        for i, o in enumerate(objects_raw):
            _check_object(o, i)
        groups_raw = d.get("groups")
        if groups_raw is None:
            groups_raw = _groups_of(objects_raw)
        groups = tuple(
            Group(str(g["color"]), str(g["shape"]), str(g["attribute"]), int(g["count"]))
            for g in groups_raw
        )
        lookup = {(g.color, g.shape, g.attribute): k for k, g in enumerate(groups)}
        objects = []
        for i, o in enumerate(objects_raw):
            key = (o["color"], o["shape"], o["attribute"])
            group = int(o["group"]) if "group" in o else lookup.get(key, -1)
            if not 0 <= group < len(groups) or key != _group_key(groups[group]):
                raise ValueError(f"scene ground truth: object {i} {key} matches no group")
            box = tuple(float(v) for v in o["box"])
            objects.append(SceneObject(*key, box=box, group=group))  # type: ignore[arg-type]
        kind = str(bg_raw.get("kind", "plain"))
        name = str(bg_raw.get("name", ""))
        color = tuple(bg_raw.get("color", BACKGROUNDS.get(name, BACKGROUNDS["white"])))
        background = Background(
            kind=kind,
            name=name,
            color=color,  # type: ignore[arg-type]
            color2=tuple(bg_raw.get("color2", color)),  # type: ignore[arg-type]
            angle=float(bg_raw.get("angle", 0.0)),
        )
        return cls(
            caption=caption,
            native_resolution=native,
            background=background,
            groups=groups,
            objects=tuple(objects),
            seed=d.get("seed"),
            index=d.get("index"),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


def _group_key(g: Group) -> tuple[str, str, str]:
    return (g.color, g.shape, g.attribute)


def _check_object(o: dict[str, Any], i: int) -> None:
    """Clear error for an object entry that cannot be drawn."""
    for field, allowed in (("color", COLORS), ("shape", SHAPES), ("attribute", ATTRIBUTES)):
        if o.get(field) not in allowed:
            raise ValueError(
                f"scene ground truth: object {i} has {field} {o.get(field)!r}; "
                f"expected one of {sorted(allowed)}"
            )
    box = o.get("box")
    if not (
        isinstance(box, (list, tuple)) and len(box) == 4 and box[0] < box[2] and box[1] < box[3]
    ):
        raise ValueError(f"scene ground truth: object {i} box {box!r} is not [x0, y0, x1, y1]")


def _groups_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group identical (colour, shape, attribute) objects in order of first appearance."""
    counts: dict[tuple[str, str, str], int] = {}
    for o in objects:
        key = (o["color"], o["shape"], o["attribute"])
        counts[key] = counts.get(key, 0) + 1
    return [{"color": c, "shape": s, "attribute": a, "count": n} for (c, s, a), n in counts.items()]


# ----------------------------------------------------------------------------------------------
# Native resolution: a counter-based hash, vectorised, so filtering never samples or renders.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014) on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, indices: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per index, a pure function of (seed, index, stream)."""
    key = _mix64(np.array([seed * 8 + stream], dtype=np.uint64))
    h = _mix64(key + (indices.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # top 53 bits → [0, 1)


def native_resolutions(seed: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Native resolution (side in px) of each scene `(seed, index)`, without sampling it."""
    _check_seed(seed)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError(f"scene indices must be >= 0, got {int(idx.min())}")
    lows = np.array([lo for lo, _ in NATIVE_OCTAVES], dtype=np.float64)
    cdf = np.cumsum([p for _, p in NATIVE_OCTAVES])
    octave = np.searchsorted(cdf / cdf[-1], _uniforms(seed, idx, 1), side="right")
    side = lows[octave] * np.exp2(_uniforms(seed, idx, 2))  # log-uniform in [lo, 2 lo)
    return np.clip(np.floor(side), NATIVE_MIN, NATIVE_MAX).astype(np.int64)


def native_resolution(seed: int, index: int) -> int:
    """Native resolution of one scene (cheap: no sampling, no rendering)."""
    return int(native_resolutions(seed, [index])[0])


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**60:
        raise ValueError(f"scenes seed must be an integer in [0, 2**60), got {seed!r}")


def _check_resolution(resolution: int, what: str = "resolution") -> None:
    if not isinstance(resolution, (int, np.integer)) or not (
        MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
    ):
        raise ValueError(
            f"scenes {what} must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] px, "
            f"got {resolution!r}"
        )


# ----------------------------------------------------------------------------------------------
# Sampling a scene.


def sample_scene(seed: int, index: int) -> Scene:
    """The scene `(seed, index)`: deterministic, independent of any global RNG."""
    native = native_resolution(seed, index)
    rng = np.random.default_rng([seed, index, 0x5CE7E5])
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    n_groups = int(rng.integers(1, min(n, MAX_GROUPS) + 1))
    cuts = np.sort(rng.choice(n - 1, n_groups - 1, replace=False) + 1) if n_groups > 1 else []
    counts = np.diff([0, *cuts, n])  # a random composition of n into n_groups parts
    groups: list[Group] = []
    colors, probs = list(COLORS), np.array(ATTRIBUTE_WEIGHTS) / sum(ATTRIBUTE_WEIGHTS)
    for c in counts:
        while True:
            g = Group(
                color=colors[rng.integers(len(colors))],
                shape=SHAPES[rng.integers(len(SHAPES))],
                attribute=ATTRIBUTES[rng.choice(len(ATTRIBUTES), p=probs)],
                count=int(c),
            )
            held_out = (g.color, g.shape) in HELD_OUT
            if not held_out and all(_group_key(g) != _group_key(h) for h in groups):
                break
        groups.append(g)
    background = _sample_background(rng)
    cells = _layout(rng, n)
    owners = [k for k, g in enumerate(groups) for _ in range(g.count)]
    objects = tuple(
        SceneObject(
            color=groups[k].color,
            shape=groups[k].shape,
            attribute=groups[k].attribute,
            box=_shape_box(groups[k].shape, cell),
            group=k,
        )
        for k, cell in zip(owners, cells, strict=True)
    )
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = make_caption(groups, template, background, rng=rng)
    return Scene(caption, native, background, tuple(groups), objects, seed, index)


def _sample_background(rng: np.random.Generator) -> Background:
    names = list(BACKGROUNDS)
    name = names[rng.integers(len(names))]
    if rng.random() < 0.5:
        return Background("plain", name, BACKGROUNDS[name], BACKGROUNDS[name], 0.0)
    other = names[rng.integers(len(names))]
    color2 = BACKGROUNDS[other] if other != name else _shade(BACKGROUNDS[name], 0.92)
    angle = round(float(rng.uniform(0.0, 360.0)), 3)
    return Background("gradient", name, BACKGROUNDS[name], color2, angle)


def _shade(rgb: RGB, f: float) -> RGB:
    return (round(rgb[0] * f), round(rgb[1] * f), round(rgb[2] * f))


def _layout(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """n square cells (x, y, side) inside the margins, at least GAP apart, in random order."""
    s_max = min(0.5, 0.6 / math.sqrt(n))
    sizes = np.sort(rng.uniform(0.55 * s_max, s_max, n))[::-1]  # place the largest first
    scale = 1.0
    while True:
        cells: list[tuple[float, float, float]] = []
        for s in sizes * scale:
            for _ in range(50):
                x, y = rng.uniform(EDGE_MARGIN, 1.0 - EDGE_MARGIN - s, 2)
                if all(
                    x + s + GAP <= cx
                    or cx + cs + GAP <= x
                    or y + s + GAP <= cy
                    or cy + cs + GAP <= y
                    for cx, cy, cs in cells
                ):
                    cells.append((float(x), float(y), float(s)))
                    break
            else:
                break
        if len(cells) == n:
            return [cells[i] for i in rng.permutation(n)]
        scale *= 0.9  # crowded: shrink every object and lay out again


_STAR_HALF_WIDTH = math.cos(math.radians(18))  # x extent of a unit star: ±cos 18°
_STAR_HEIGHT = 1.0 + math.cos(math.radians(36))  # y extent: from −1 (top tip) to cos 36°


def _shape_box(shape: str, cell: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """Tight box of `shape` drawn in the square cell (x, y, side); rendering uses only this."""
    x, y, s = cell
    if shape != "star":
        return (x, y, x + s, y + s)
    radius = s / (2 * _STAR_HALF_WIDTH)
    h = radius * _STAR_HEIGHT
    top = y + (s - h) / 2
    return (x, top, x + s, top + h)


# ----------------------------------------------------------------------------------------------
# Captions.


def _phrase(g: Group, one: str) -> str:
    words = [g.attribute] if g.attribute != "plain" else []
    words += [g.color, g.shape + ("s" if g.count > 1 else "")]
    if g.count > 1:
        count = COUNT_WORDS[g.count]
    elif one == "one":
        count = "one"
    else:
        count = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([count, *words])


def make_caption(
    groups: Sequence[Group],
    template: str = "{objs}",
    background: Background | None = None,
    rng: np.random.Generator | None = None,
) -> str:
    """Caption for `groups` from a template with {objs}, {bg}, {be}; counts as words."""
    if not groups:
        raise ValueError("a caption needs at least one group of objects")
    one = "one" if rng is not None and rng.random() < 0.2 else "a"
    phrases = [_phrase(g, one) for g in groups]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if background is None:
        bg = "white"
    else:
        bg = background.name if background.kind == "plain" else "shaded"
    return template.format(objs=objs, bg=bg, be="is" if groups[0].count == 1 else "are")


_NUMBERS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(COUNT_WORDS)}}
_PHRASE_RE = re.compile(
    r"\b(an|a|one|two|three|four|five)\s+"
    rf"(?:({'|'.join(a for a in ATTRIBUTES if a != 'plain')})\s+)?"
    rf"({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(s?)\b"
)


def parse_caption(caption: str) -> list[Group]:
    """The counted phrases of a scenes caption, in order ("two striped red stars" → Group)."""
    return [
        Group(color=m[3], shape=m[4], attribute=m[2] or "plain", count=_NUMBERS[m[1]])
        for m in _PHRASE_RE.finditer(caption.lower())
    ]


def make_scene(
    groups: Sequence[Group],
    seed: int = 0,
    native_resolution: int = 256,
    template: str = "{objs}",
    background: str = "white",
) -> Scene:
    """A scene with the given groups (e.g. for evaluation prompts), laid out from `seed`."""
    _check_seed(seed)
    _check_resolution(native_resolution, "native_resolution")
    n = sum(g.count for g in groups)
    if not 1 <= n <= MAX_OBJECTS or any(g.count < 1 for g in groups):
        raise ValueError(
            f"a scene holds 1 to {MAX_OBJECTS} objects, got counts {[g.count for g in groups]}"
        )
    for i, g in enumerate(groups):
        _check_object({**asdict(g), "box": [0, 0, 1, 1]}, i)
    if len({_group_key(g) for g in groups}) != len(groups):
        raise ValueError("make_scene: two groups share colour, shape and attribute; merge them")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")
    rng = np.random.default_rng([seed, 0x6D616B65])
    bg = Background("plain", background, BACKGROUNDS[background], BACKGROUNDS[background], 0.0)
    cells = _layout(rng, n)
    owners = [k for k, g in enumerate(groups) for _ in range(g.count)]
    objects = tuple(
        SceneObject(g.color, g.shape, g.attribute, _shape_box(g.shape, cell), k)
        for k, cell in zip(owners, cells, strict=True)
        for g in [groups[k]]
    )
    caption = make_caption(groups, template, bg)
    return Scene(caption, native_resolution, bg, tuple(groups), objects, seed, None)


# ----------------------------------------------------------------------------------------------
# Rendering: analytic anti-aliasing — each pixel takes the area coverage of a signed distance
# field, α = clip(0.5 − d, 0, 1) with d in pixels (a box filter across the edge).


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


def _star_vertices(cx: float, top: float, radius: float) -> np.ndarray:
    k = np.arange(10)
    r = np.where(k % 2 == 0, radius, radius * STAR_INNER)
    theta = np.deg2rad(-90.0 + 36.0 * k)
    cy = top + radius
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


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
        verts = np.array([[cx, y0], [x1, y1], [x0, y1]])
        return _polygon_sdf(verts, xs, ys)
    if shape == "star":
        radius = (x1 - x0) / (2 * _STAR_HALF_WIDTH)
        return _polygon_sdf(_star_vertices(cx, y0, radius), xs, ys)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _fade(period_px: float) -> float:
    """Pattern contrast kept at this period: patterns under 2 px average out (box filter)."""
    return min(max(period_px - 2.0, 0.0), 1.0)


def _tint_weight(attribute: str, d, alpha, xs, ys, cx: float, cy: float, n: int):
    """Per-pixel coverage of the tint (the rest of `alpha` is the full colour), or None."""
    if attribute == "striped":
        period = STRIPE_PERIOD * n
        f = _fade(period)
        if f == 0.0:
            return alpha * 0.5
        u = ((xs - cx) + (ys - cy)) * math.sqrt(0.5)  # distance along the stripes' normal
        stripe = _coverage(np.abs(np.mod(u, period) - period / 2) - period / 4)
        return alpha * (0.5 + f * (stripe - 0.5))  # unresolvable stripes fade to their mean
    if attribute == "dotted":
        spacing, radius = DOT_SPACING * n, DOT_RADIUS * n
        mean = math.pi * radius * radius / (spacing * spacing)  # dot area / cell area
        f = _fade(spacing)
        if f == 0.0:
            return alpha * mean
        dx = np.mod(xs - cx, spacing) - spacing / 2
        dy = np.mod(ys - cy, spacing) - spacing / 2
        dots = _coverage(np.sqrt(dx * dx + dy * dy) - radius)
        return alpha * (mean + f * (dots - mean))
    if attribute == "outlined":
        # interior (the shape inset by the outline width) in tint; the ring α − inner in colour
        return _coverage(d + OUTLINE_WIDTH * n)
    if attribute == "plain":
        return None
    raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")


def _background(bg: Background, n: int) -> np.ndarray:
    """The background as planar uint8 [3, n, n] (planar keeps every loop contiguous)."""
    canvas = np.empty((3, n, n), dtype=np.uint8)
    if bg.kind == "plain" or bg.color == bg.color2:
        for k in range(3):
            canvas[k].fill(bg.color[k])
        return canvas
    if bg.kind != "gradient":
        raise ValueError(f"unknown background kind {bg.kind!r}; expected 'plain' or 'gradient'")
    a = math.radians(bg.angle)
    ca, sa = math.cos(a), math.sin(a)
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    # g = ½ + (x cos a + y sin a) / (|cos a| + |sin a|) ∈ [0, 1] over the image
    g = (coords[None, :] * ca + coords[:, None] * sa) * (1.0 / (abs(ca) + abs(sa))) + 0.5
    for k in range(3):
        c1, c2 = float(bg.color[k]), float(bg.color2[k])
        canvas[k] = g * (c2 - c1) + (c1 + 0.5)  # c = c1 + g (c2 − c1), rounded
    return canvas


def _draw(scene: Scene, resolution: int | None) -> np.ndarray:
    """The scene drawn at `resolution`² px (default: native) as planar uint8 [3, H, W]."""
    n = scene.native_resolution if resolution is None else resolution
    _check_resolution(n)
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
            if a_tint is None:
                region[k] += alpha * c
            else:
                t = (1.0 - TINT) * c + TINT * 255.0  # t = (1 − τ) c + τ white
                region[k] += (alpha - a_tint) * c + a_tint * t
        region += 0.5
        canvas[:, r0:r1, c0:c1] = region  # convex mix of values in [0, 255]: no clipping needed
    return canvas


def render(scene: Scene, resolution: int | None = None) -> Image.Image:
    """The scene drawn directly (crisp, anti-aliased) at `resolution`² px; default native."""
    return Image.merge("RGB", [Image.fromarray(plane) for plane in _draw(scene, resolution)])


def render_array(scene: Scene, resolution: int | None = None) -> np.ndarray:
    """`render` as a uint8 array [H, W, 3]."""
    return np.array(render(scene, resolution))


def render_native(
    scene: Scene, resolution: int | None = None, oversample: int | None = 4
) -> Image.Image:
    """The image a data set holds: drawn at its native size N, then resized to `resolution`
    like a real image (bicubic, antialiased: the filter the real-data readers use).

    With `oversample` k, a scene with N > k·R is drawn at k·R instead of N: the same picture
    once the k·R → R low-pass has removed what lies above R's Nyquist frequency, at a fraction
    of the cost (measured difference < 0.1 grey level on average; None: always draw at N).
    """
    n = scene.native_resolution
    if resolution is None or resolution == n:
        return render(scene, n)
    _check_resolution(resolution)
    if oversample is not None and n > oversample * resolution:
        n = oversample * resolution
    return render(scene, n).resize((resolution, resolution), RESAMPLE)


def scene_key(seed: int, index: int) -> str:
    """Stable sample key (no dots, so webdataset keeps it whole)."""
    return f"s{seed}-{index:09d}"


def scene_item(seed: int, index: int, resolution: int) -> dict[str, Any]:
    """One data set item: {"image": [3, R, R] in [−1, 1], "caption", "key", "meta"}."""
    scene = sample_scene(seed, index)
    planes = np.stack([np.asarray(p) for p in render_native(scene, resolution).split()])
    pixels = planes.astype(np.float32)
    pixels *= 1.0 / 127.5
    pixels -= 1.0  # x = p / 127.5 − 1 maps [0, 255] to [−1, 1]
    return {
        "image": torch.from_numpy(pixels),
        "caption": scene.caption,
        "key": scene_key(seed, index),
        "meta": scene.to_json(),
    }


# ----------------------------------------------------------------------------------------------
# Data sets.


def _check_min_native(min_native: int) -> None:
    if not isinstance(min_native, (int, np.integer)) or min_native < 0:
        raise ValueError(f"min_native must be an integer >= 0, got {min_native!r}")
    if min_native > NATIVE_MAX:
        raise ValueError(
            f"min_native={min_native}: no scene is larger than {NATIVE_MAX} px, so none would "
            f"pass; use min_native <= {NATIVE_MAX}"
        )


class ScenesDataset(Dataset):
    """Scenes 0..count−1 of `seed` (map-style); with `min_native`, only those whose native
    resolution is at least that (the high-resolution subset). `train` is accepted for parity
    with the real readers: scenes are square, so random and centre crops coincide."""

    def __init__(
        self, count: int, resolution: int, seed: int = 0, min_native: int = 0, train: bool = True
    ) -> None:
        if not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"ScenesDataset count must be a positive integer, got {count!r}")
        _check_resolution(resolution)
        _check_seed(seed)
        _check_min_native(min_native)
        self.resolution, self.seed = resolution, seed
        self.min_native, self.train = min_native, train
        self.total = int(count)
        self.indices = np.flatnonzero(native_resolutions(seed, np.arange(count)) >= min_native)
        if len(self.indices) == 0:
            raise ValueError(
                f"ScenesDataset(count={count}, min_native={min_native}): no scene passes the "
                "native-resolution filter; use a larger count or a lower min_native"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"ScenesDataset index {i} out of range for {len(self)} samples")
        return scene_item(self.seed, int(self.indices[i]), self.resolution)

    def kept_summary(self) -> str:
        """How many scenes passed the native-resolution filter."""
        return (
            f"scenes: kept {len(self)} of {self.total} "
            f"({100 * len(self) / self.total:.1f}%) with native resolution >= {self.min_native} px"
        )


def shard_indices(
    seed: int, shard: int, shards: int, min_native: int = 0, start: int = 0, block: int = 4096
) -> Iterator[int]:
    """Endless scene indices ≥ `start` with index ≡ shard (mod shards) whose native resolution
    passes `min_native`: disjoint across shards, together every passing index exactly once."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    first = start + (shard - start) % shards
    while True:
        idx = np.arange(first, first + block * shards, shards, dtype=np.int64)
        if min_native > NATIVE_MIN:
            idx = idx[native_resolutions(seed, idx) >= min_native]
        yield from (int(i) for i in idx)
        first += block * shards


class ScenesStream(IterableDataset):
    """Endless scenes of `seed` from index `start` on, split across DataLoader workers and
    torch.distributed ranks without duplicates (rank/world_size default to the process group)."""

    def __init__(
        self,
        resolution: int,
        seed: int = 0,
        min_native: int = 0,
        train: bool = True,
        start: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_resolution(resolution)
        _check_seed(seed)
        _check_min_native(min_native)
        if start < 0:
            raise ValueError(f"ScenesStream start must be >= 0, got {start}")
        self.resolution, self.seed = resolution, seed
        self.min_native, self.train = min_native, train
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, shards = rank * workers + worker, world * workers
        for index in shard_indices(self.seed, shard, shards, self.min_native, self.start):
            yield scene_item(self.seed, index, self.resolution)


# ----------------------------------------------------------------------------------------------
# Writing a data set on disk in the formats the real readers read.

KEPT_THRESHOLDS = (64, 128, 256, 512, 1024)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=3)
    else:
        image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_dataset(
    out: str | Path,
    count: int,
    resolution: int | None = None,
    fmt: str = "folder",
    seed: int = 0,
    image_format: str = "png",
    shard_size: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Write scenes 0..count−1 to `out` and return a summary with kept counts.

    folder: ``out/{shard:05d}/{key}.{png|jpg}`` + ``.txt`` caption + ``.json`` ground truth;
    webdataset: ``out/{shard:05d}.tar`` with the same members, as img2dataset writes them.
    Images are stored at native size (resolution=None, so readers' min_native filters work as
    on real data) or resized to `resolution`; the .json holds the ground truth plus
    img2dataset's width/height/original_width/original_height. Also writes
    ``out/scenes_stats.json``: how many scenes have native resolution ≥ 64 … 1024 px.
    """
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"scenes --count must be a positive integer, got {count!r}")
    if resolution is not None:
        _check_resolution(resolution)
    _check_seed(seed)
    if fmt not in ("folder", "webdataset"):
        raise ValueError(f"unknown format {fmt!r}; expected 'folder' or 'webdataset'")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"unknown image format {image_format!r}; expected 'png' or 'jpg'")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    writer = None
    if fmt == "webdataset":
        import webdataset as wds

        writer = wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0, mtime=0)
    indices: Iterator[int] = iter(range(count))
    if progress:
        from tqdm import tqdm

        indices = iter(tqdm(range(count), desc=f"scenes → {out}", unit="scene"))
    natives = native_resolutions(seed, np.arange(count))
    try:
        for index in indices:
            scene = sample_scene(seed, index)
            image = render_native(scene, resolution)
            key = scene_key(seed, index)
            meta = scene.to_dict()
            meta.update(
                key=key,
                status="success",
                width=image.width,
                height=image.height,
                original_width=scene.native_resolution,
                original_height=scene.native_resolution,
            )
            data = _encode(image, image_format)
            ground_truth = json.dumps(meta, separators=(",", ":")).encode()
            if writer is not None:
                writer.write(
                    {
                        "__key__": key,
                        image_format: data,
                        "txt": scene.caption.encode(),
                        "json": ground_truth,
                    }
                )
            else:
                folder = out / f"{index // shard_size:05d}"
                folder.mkdir(exist_ok=True)
                (folder / f"{key}.{image_format}").write_bytes(data)
                (folder / f"{key}.txt").write_text(scene.caption + "\n", encoding="utf-8")
                (folder / f"{key}.json").write_bytes(ground_truth)
    finally:
        if writer is not None:
            writer.close()
    summary = {
        "count": int(count),
        "format": fmt,
        "image_format": image_format,
        "resolution": resolution,
        "seed": seed,
        "shards": (count + shard_size - 1) // shard_size,
        "kept": {str(t): int((natives >= t).sum()) for t in KEPT_THRESHOLDS},
    }
    (out / "scenes_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
