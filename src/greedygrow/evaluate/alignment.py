"""Alignment on scenes: DSG-style questions answered by classical image analysis, no weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from greedygrow.data.scenes import (
    COLORS,
    HELD_OUT,
    OUTLINE_WIDTH,
    SHAPES,
    TINT,
    Group,
    Scene,
    make_scene,
    sample_scene,
)

ATTRIBUTE_MIN_RESOLUTION = 128
ANALYSIS_MAX = 512  # larger images are analysed block-averaged to at least this
MIN_CONTRAST = 0.1  # ‖p − B‖ below this is background (in [0, 1] RGB units)
MIN_AREA = 0.0015  # smallest object kept, as a fraction of the image (smaller specks are noise)
MAX_COUNT = 5
_INKS_RGB = np.array([*COLORS.values()], dtype=np.float32) / 255.0
_TINTS_RGB = (1.0 - TINT) * _INKS_RGB + TINT  # t = (1 − τ) c + τ white  (scenes renderer)
_COLOR_NAMES = list(COLORS)
ImageLike = Image.Image | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Question:
    """One DSG-style question; `expected` is True (yes) or an int (a count)."""

    id: str
    kind: str  # "entity" | "count" | "attribute"
    text: str
    color: str
    shape: str
    expected: bool | int
    attribute: str | None = None
    parent: str | None = None


def make_questions(scene: Scene, resolution: int) -> list[Question]:
    """Entity, count and (from ATTRIBUTE_MIN_RESOLUTION px) attribute questions per entity."""
    entities: dict[tuple[str, str], int] = {}
    attributes: dict[tuple[str, str], list[str]] = {}
    for g in scene.groups:
        key = (g.color, g.shape)
        entities[key] = entities.get(key, 0) + g.count
        if g.attribute != "plain" and g.attribute not in attributes.setdefault(key, []):
            attributes[key].append(g.attribute)
    out: list[Question] = []
    for i, ((color, shape), n) in enumerate(entities.items()):
        e = f"e{i}"
        out.append(Question(e, "entity", f"is there a {color} {shape}?", color, shape, True))
        count = f"how many {color} {shape}s are there?"
        out.append(Question(f"c{i}", "count", count, color, shape, n, parent=e))
        if resolution >= ATTRIBUTE_MIN_RESOLUTION:
            for j, attr in enumerate(attributes.get((color, shape), [])):
                text = f"is a {color} {shape} {attr}?"
                out.append(Question(f"a{i}.{j}", "attribute", text, color, shape, True, attr, e))
    return out


@dataclass(frozen=True)
class Detection:
    """An object found in the image, with the measurements its labels came from."""

    color: str
    shape: str
    attribute: str | None  # None below ATTRIBUTE_MIN_RESOLUTION (not resolvable)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as image fractions
    area: float  # coverage-weighted area as a fraction of the image
    solidity: float
    extent: float
    height: float  # centroid row within the object, 0 = top, 1 = bottom
    tint_mean: float
    tint_std: float
    coherence: float
    ring_contrast: float


def to_array(image: ImageLike) -> np.ndarray:
    """Float32 [H, W, 3] in [0, 1] from PIL, an HWC array or a [3,H,W] tensor in [−1, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] in [-1, 1], got {tuple(t.shape)}")
        return ((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image array must be [H, W, 3], got shape {a.shape}")
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def _terms(xs: np.ndarray, ys: np.ndarray, w: int, h: int, degree: int) -> list[np.ndarray]:
    """Polynomial terms 1, x, y (, x², xy, y²) of pixel centres, x and y in [−½, ½]."""
    x, y = np.broadcast_arrays((xs + 0.5) / w - 0.5, (ys + 0.5) / h - 0.5)
    terms = [np.ones_like(x), x, y]
    return [*terms, x * x, x * y, y * y] if degree == 2 else terms


def _fit_background(img: np.ndarray, use: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares polynomial background B [H, W, 3] on the pixels in `use`, outliers cut."""
    h, w, _ = img.shape
    ys, xs = np.nonzero(use)
    step = max(1, ys.size // 20000)  # a regular subsample is plenty for ≤ 6 terms
    ys, xs = ys[::step], xs[::step]
    a = np.stack(_terms(xs, ys, w, h, degree), 1)
    vals = img[ys, xs]
    keep = np.ones(len(vals), dtype=bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], vals[keep], rcond=None)
        res = np.sqrt(((vals - a @ coef) ** 2).sum(1))
        scale = 1.4826 * np.median(res[keep]) + 2.0 / 255  # robust σ (MAD), floored
        new = res < 3.0 * scale
        if (new == keep).all() or new.sum() < a.shape[1] * 4:
            break
        keep = new
    gy, gx = np.ogrid[:h, :w]
    return (np.stack(_terms(gx, gy, w, h, degree), -1) @ coef).astype(np.float32)  # Σ_j c_j t_j


def _label_pixels(img: np.ndarray, bg: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(colour index per pixel, −1 for none; coverage in [0, 1]) from p = B + a (ink − B)."""
    d_all = img - bg
    threshold = max(MIN_CONTRAST, 2.0 * math.sqrt(3.0) * noise)
    fit = (d_all * d_all).sum(-1) > threshold**2
    d, b = d_all[fit].T, bg[fit].T  # planar [3, N]: channel sums stay vectorised
    best = np.full(d.shape[1], np.inf, dtype=np.float32)
    lab = np.zeros(d.shape[1], dtype=np.int64)
    cov = np.zeros(d.shape[1], dtype=np.float32)
    for k in range(len(_INKS_RGB)):
        ct = _along(d, _TINTS_RGB[k][:, None] - b)
        for ink in (_INKS_RGB[k], _TINTS_RGB[k]):
            e = ink[:, None] - b  # direction from the background to the ink, per pixel
            r = d - _along(d, e) * e  # p = B + a (ink − B); residual ‖d − a e‖
            res = _dot(r, r)
            better = res < best
            best = np.where(better, res, best)
            lab = np.where(better, k, lab)
            cov = np.where(better, ct, cov)
    dist = np.sqrt(_dot(d, d))
    # residual < 0.08 + 0.35·dist + 3·min(noise, 0.05): ours, tuned (docs/evaluation.md)
    explained = np.sqrt(best) < 0.08 + 0.35 * dist + 3 * min(noise, 0.05)
    lab = np.where(explained & (cov >= 0.5), lab, -1)
    label = np.full(fit.shape, -1, dtype=np.int64)
    cover = np.zeros(fit.shape, dtype=np.float32)
    label[fit], cover[fit] = lab, cov
    return label, cover


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _along(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """a = ⟨d, e⟩ / ‖e‖² clipped to [0, 1]: how far each planar d reaches along e."""
    return np.clip(_dot(d, e) / np.maximum(_dot(e, e), 1e-6), 0.0, 1.0)


def _shape_descriptors(mask: np.ndarray, cover: np.ndarray) -> tuple[float, float, float]:
    """(solidity, extent, centroid height) of one component's sub-pixel mask."""
    ys, xs = np.nonzero(mask)
    size = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    up = int(np.clip(math.ceil(96 / size), 1, 16))
    fine = ndimage.zoom(
        np.where(mask, cover, 0.0).astype(np.float32), up, order=1, mode="nearest", grid_mode=True
    )
    fine = ndimage.binary_fill_holes(fine >= 0.5)
    area = float(fine.sum())
    if area < 9:
        return 1.0, 1.0, 0.5
    rows = np.flatnonzero(fine.any(1))
    cy = (np.nonzero(fine)[0].mean() - rows[0] + 0.5) / (rows[-1] - rows[0] + 1)
    edge = fine & ~ndimage.binary_erosion(fine)
    ey, ex = np.nonzero(edge)
    pts = np.stack([ex, ey], 1).astype(np.float64) + 0.5  # boundary pixel centres
    try:
        hull = pts[ConvexHull(pts).vertices]
    except QhullError:  # degenerate (collinear) component
        return 1.0, 1.0, float(cy)
    x, y = hull.T  # shoelace: A = ½ |Σ x_i y_{i−1} − y_i x_{i−1}|
    shoelace = 0.5 * abs(x @ np.roll(y, 1) - y @ np.roll(x, 1))
    edges = np.roll(hull, -1, 0) - hull
    perim = np.linalg.norm(edges, axis=1).sum()
    # A' ≈ A + ½ P + 1: the hull of pixel centres grown by a unit square (Minkowski sum)
    hull_area = shoelace + 0.5 * perim + 1.0
    # minimum-area enclosing rectangle: one side lies along a hull edge (rotating calipers)
    ang = np.arctan2(edges[:, 1], edges[:, 0])
    rot = np.stack([np.cos(ang), np.sin(ang)], 1)
    u = hull @ rot.T
    v = hull @ np.stack([-rot[:, 1], rot[:, 0]], 1).T
    rect = ((u.max(0) - u.min(0) + 1.0) * (v.max(0) - v.min(0) + 1.0)).min()
    return area / max(hull_area, 1e-9), area / max(rect, 1e-9), float(cy)


def _classify_shape(solidity: float, extent: float, height: float) -> str:
    """Shape from descriptors; the cuts sit between measured values (docs/evaluation.md)."""
    if solidity < 0.88 and height < 0.59:
        return "star"
    if height >= 0.59 or extent < 0.70:
        return "triangle"
    return "square" if extent >= 0.89 else "circle"


def _attribute_features(
    mask: np.ndarray, patch: np.ndarray, k: int, ring_px: float, noise: float
) -> tuple[float, float, float, float]:
    """(mean s, pattern std s, coherence, ring contrast) of the tint map inside one object."""
    c, tc = _INKS_RGB[k], _TINTS_RGB[k] - _INKS_RGB[k]
    # s = ⟨p − c, t − c⟩ / ‖t − c‖² ∈ [0, 1]: 0 at colour k, 1 at its tint
    tint = np.clip(((patch - c) * tc).sum(-1) / float(tc @ tc), 0.0, 1.0)
    depth = ndimage.distance_transform_edt(mask)
    inner = depth > ring_px + 1.0  # inside the outline ring (if there is one)
    if inner.sum() < 4:
        inner = depth >= depth.max()
    ring = (depth > 1.0) & (depth <= ring_px + 1.0)
    s_in = tint[inner]
    ring_contrast = float(s_in.mean() - tint[ring].mean()) if ring.any() else 0.0
    gy, gx = np.gradient(tint)
    # structure tensor J = Σ ∇s ∇sᵀ; coherence (λ1 − λ2)/(λ1 + λ2): 1 for stripes, 0 for dots
    jxx, jyy, jxy = (gx * gx)[inner].sum(), (gy * gy)[inner].sum(), (gx * gy)[inner].sum()
    tr = jxx + jyy
    coherence = float(math.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy) / tr) if tr > 1e-9 else 0.0
    # noise in s has σ_s = σ / ‖t − c‖; σ_pattern² = std² − σ_s²
    s_noise = noise / float(np.linalg.norm(tc))
    std = math.sqrt(max(float(s_in.std()) ** 2 - s_noise**2, 0.0))
    return float(s_in.mean()), std, coherence, ring_contrast


def _classify_attribute(mean: float, std: float, coherence: float, ring: float) -> str:
    # cut-offs are ours, between the measured clusters of clean renders (docs/evaluation.md)
    if std >= 0.15:  # a resolved pattern of colour and tint
        return "striped" if coherence >= 0.5 else "dotted"
    if mean >= 0.6 and ring >= 0.3:
        return "outlined"  # tinted interior inside a ring of full colour
    return "plain" if mean < 0.3 else "tinted"


def _segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(label, cover, noise σ): background from the border, then refitted away from objects."""
    h, w, _ = img.shape
    b = max(1, round(0.015 * min(h, w)))
    border = np.ones((h, w), dtype=bool)
    border[b:-b, b:-b] = False
    bg = _fit_background(img, border, degree=1)
    noise = float(1.4826 * np.median(np.abs(img[border] - bg[border])))  # per-channel σ (MAD)
    label, cover = _label_pixels(img, bg, noise)
    far = ~ndimage.binary_dilation(label >= 0, iterations=2)
    if far.sum() > 0.1 * far.size:
        label, cover = _label_pixels(img, _fit_background(img, far, degree=2), noise)
    return label, cover, noise


def detect(image: ImageLike) -> list[Detection]:
    """Objects in an image: colour, shape and (from ATTRIBUTE_MIN_RESOLUTION up) attribute."""
    full = to_array(image)
    if min(full.shape[:2]) < 16:
        raise ValueError(f"image of {full.shape[1]}×{full.shape[0]} px: too small (under 16 px)")
    resolve = min(full.shape[:2]) >= ATTRIBUTE_MIN_RESOLUTION
    f = max(1, min(full.shape[:2]) // ANALYSIS_MAX)  # block-mean down to ≥ ANALYSIS_MAX px
    h, w = full.shape[0] // f, full.shape[1] // f
    img = full[: h * f, : w * f].reshape(h, f, w, f, 3).mean((1, 3))
    label, cover, noise = _segment(img)
    ring_px = max(1.0, OUTLINE_WIDTH * min(h, w))
    out = []
    for k, color in enumerate(_COLOR_NAMES):
        comps, _ = ndimage.label(label == k, structure=np.ones((3, 3)))
        for i, (ys, xs) in enumerate(ndimage.find_objects(comps), start=1):
            pad = tuple(slice(max(q.start - 2, 0), q.stop + 2) for q in (ys, xs))
            mask = comps[pad] == i
            area = float(cover[pad][mask].sum())
            if area < max(MIN_AREA * h * w, 3.0):
                continue
            shape = _shape_descriptors(ndimage.binary_dilation(mask), cover[pad])
            attr = _attribute_features(ndimage.binary_fill_holes(mask), img[pad], k, ring_px, noise)
            attribute = _classify_attribute(*attr) if resolve else None
            box = (xs.start / w, ys.start / h, xs.stop / w, ys.stop / h)
            named = _classify_shape(*shape)
            out.append(Detection(color, named, attribute, box, area / (h * w), *shape, *attr))
    return out


def answer(question: Question, detections: Sequence[Detection]) -> bool | int:
    """The answer the image gives: any match, the number of matches, or any with the attribute."""
    matches = [d for d in detections if d.color == question.color and d.shape == question.shape]
    attribute = any(d.attribute == question.attribute for d in matches)
    return {"entity": bool(matches), "count": len(matches), "attribute": attribute}[question.kind]


@dataclass
class PromptResult:
    """One image scored against one prompt: answers, correctness and the prompt's scores."""

    caption: str
    resolution: int
    questions: list[Question]
    answers: list[bool | int]
    correct: list[bool]  # after DSG dependencies: wrong whenever the parent is wrong
    detections: list[Detection] = field(default_factory=list)

    @property
    def score(self) -> float:
        """DSG prompt score: the fraction of questions answered correctly."""
        return sum(self.correct) / len(self.correct) if self.correct else 1.0

    @property
    def all_correct(self) -> bool:
        return all(self.correct)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score, "all_correct": self.all_correct}


def score_questions(
    questions: list[Question], detections: list[Detection], caption: str = "", resolution: int = 0
) -> PromptResult:
    """Answer `questions` from `detections` and apply DSG's parent → child dependencies."""
    answers = [answer(q, detections) for q in questions]
    raw = {q.id: a == q.expected for q, a in zip(questions, answers, strict=True)}
    correct = [raw[q.id] and (q.parent is None or raw[q.parent]) for q in questions]
    return PromptResult(caption, resolution, list(questions), answers, correct, list(detections))


def score_image(image: ImageLike, scene: Scene, caption: str | None = None) -> PromptResult:
    """Detect objects in `image` and score them against the prompt's ground truth."""
    arr = to_array(image)
    resolution = min(arr.shape[:2])
    questions = make_questions(scene, resolution)
    return score_questions(questions, detect(arr), caption or scene.caption, resolution)


def summarize(results: Iterable[PromptResult]) -> dict[str, Any]:
    """DSG score, all-correct rate, accuracy per kind and per count, and the count confusion."""
    results = list(results)
    per_kind: dict[str, list[bool]] = {}
    per_count: dict[int, list[bool]] = {}
    confusion = np.zeros((MAX_COUNT, MAX_COUNT + 2), dtype=np.int64)  # true 1..5 × pred 0..6+
    for r in results:
        for q, a, c in zip(r.questions, r.answers, r.correct, strict=True):
            per_kind.setdefault(q.kind, []).append(c)
            if q.kind == "count" and 1 <= int(q.expected) <= MAX_COUNT:
                per_count.setdefault(int(q.expected), []).append(c)
                confusion[int(q.expected) - 1, min(int(a), MAX_COUNT + 1)] += 1
    n_questions = sum(len(r.questions) for r in results)
    asks = [any((q.color, q.shape) in HELD_OUT for q in r.questions) for r in results]
    held_out = [r.score for r, a in zip(results, asks, strict=True) if a]
    seen = [r.score for r, a in zip(results, asks, strict=True) if not a]
    return {
        "prompts": len(results),
        "questions": n_questions,
        "dsg_score": float(np.mean([r.score for r in results])),
        "all_correct": float(np.mean([r.all_correct for r in results])),
        "question_accuracy": float(sum(sum(r.correct) for r in results) / max(n_questions, 1)),
        "held_out_dsg_score": float(np.mean(held_out)) if held_out else None,
        "held_out_prompts": len(held_out),
        "seen_dsg_score": float(np.mean(seen)) if seen else None,  # the prompts without them
        "accuracy": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
        "count_accuracy": {str(n): float(np.mean(per_count[n])) for n in sorted(per_count)},
        "count_confusion": {
            "true": list(range(1, MAX_COUNT + 1)),
            "predicted": [*map(str, range(MAX_COUNT + 1)), f"{MAX_COUNT + 1}+"],
            "matrix": confusion.tolist(),
        },
    }


EVAL_SEED = 2**40 + 17  # a scenes seed no training run uses by default: unseen layouts


def scene_prompts(count: int, seed: int = EVAL_SEED) -> list[Scene]:
    """`count` evaluation scenes: counting prompts, compositions and held-out pairs in turn."""
    rng = np.random.default_rng([seed, 0xC0])
    pick = lambda options: options[rng.integers(len(options))]
    attrs = ["plain", "plain", "striped", "dotted", "outlined"]
    scenes = []
    for i in range(count):
        if i % 2 == 0:
            g = Group(pick(_COLOR_NAMES), pick(SHAPES), pick(attrs), (i // 2) % MAX_COUNT + 1)
            background = ["white", "light grey", "cream"][i % 3]
            scenes.append(make_scene([g], seed=int(rng.integers(2**31)), background=background))
        elif i % 4 == 3:
            color, shape = sorted(HELD_OUT)[(i // 4) % len(HELD_OUT)]
            held = Group(color, shape, pick(attrs), int(rng.integers(1, 4)))
            scenes.append(make_scene([held], seed=int(rng.integers(2**31))))
        else:
            scenes.append(sample_scene(seed, i))
    return scenes
