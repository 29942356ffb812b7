"""Alignment on scenes: DSG-style questions from a prompt, answered by classical image analysis.

This is the project's analogue of DSG-1k (Cho et al. 2024) and of the Gecko numerical split
(counting up to five): questions are generated from a scene's ground truth, each answered from
the image with no learned weights, and scored per question, per prompt and per count.

Questions, per entity (a colour + shape named by the prompt):

- ``entity``     "is there a red circle?"                  (yes)
- ``count``      "how many red circles are there?"         (the number; parent: entity)
- ``attribute``  "are the red circles striped?"            (yes; parent: entity), asked only
  for non-plain attributes and only at resolutions ≥ ATTRIBUTE_MIN_RESOLUTION, where the
  scenes renderer resolves stripes, dots and outlines (below it they blur into a flat tint).

As in DSG, a child question counts as wrong whenever its parent is answered wrong. A prompt's
score is the mean over its questions; it is *all correct* when every question is right.

The analyser (`detect`) models every pixel as a blend of a smooth background and one palette
ink (an object colour or its light tint): p = B + a (ink − B); docs/evaluation.md ("The
analyser") gives its steps and cut-offs, and "How far to trust it" its measured accuracy.
"""

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

# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


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


def as_scene(truth: Scene | dict | str) -> Scene:
    """A Scene from a Scene, its ground-truth dict, or its JSON string."""
    if isinstance(truth, str):
        return Scene.from_json(truth)
    return Scene.from_dict(truth) if isinstance(truth, dict) else truth


def make_questions(truth: Scene | dict | str, resolution: int) -> list[Question]:
    """DSG-style questions for a prompt's ground truth, for an image of `resolution` px.

    One entity, one count and (at resolution ≥ ATTRIBUTE_MIN_RESOLUTION) one attribute
    question per non-plain attribute, for each colour + shape the prompt names.
    """
    scene = as_scene(truth)
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


# --------------------------------------------------------------------------------------------
# Image analysis
# --------------------------------------------------------------------------------------------


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


def to_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 [H, W, 3] in [0, 1] from a PIL image, uint8/float HWC array, or a [3,H,W]
    tensor in [−1, 1] (the sampler's and the data sets' convention)."""
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
    """Least-squares polynomial background (per channel) fitted on the pixels in `use`,
    refitted twice without outliers; returns B [H, W, 3] float32."""
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
    """Each pixel as B + a (ink − B) for the best of the colour and tint inks: (label, cover),
    label the colour index per pixel (−1 = background / unexplained), cover the object
    coverage in [0, 1] (0.5 = halfway to the colour's tint).

    Only pixels significantly far from the background are fitted: ‖p − B‖ above MIN_CONTRAST
    (half the way from any background to the nearest tint is more than twice that) and above
    2·√3·σ (σ the per-channel noise: pure noise passes with probability < 1%, so a noise image
    yields no objects).
    """
    d_all = img - bg
    threshold = max(MIN_CONTRAST, 2.0 * math.sqrt(3.0) * noise)
    fit = (d_all * d_all).sum(-1) > threshold**2
    d, b = d_all[fit].T, bg[fit].T  # planar [3, N]: channel sums stay vectorised
    best = np.full(d.shape[1], np.inf, dtype=np.float32)
    lab = np.zeros(d.shape[1], dtype=np.int64)
    cov = np.zeros(d.shape[1], dtype=np.float32)
    for k in range(len(_INKS_RGB)):
        # coverage measured towards the tint: a tint pixel is fully covered (1)
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
    # a blend of B and one palette ink, up to noise (capped: noise is no licence);
    # residual < 0.08 + 0.35·dist + 3·min(noise, 0.05): ours, tuned on renders with noise
    # and blur (docs/evaluation.md, "How far to trust it")
    explained = np.sqrt(best) < 0.08 + 0.35 * dist + 3 * min(noise, 0.05)
    lab = np.where(explained & (cov >= 0.5), lab, -1)
    label = np.full(fit.shape, -1, dtype=np.int64)
    cover = np.zeros(fit.shape, dtype=np.float32)
    label[fit], cover[fit] = lab, cov
    return label, cover


def _tint_map(img: np.ndarray, k: int) -> np.ndarray:
    """s = ⟨p − c, t − c⟩ / ‖t − c‖² ∈ [0, 1]: 0 at colour k, 1 at its tint (for pixels fully
    inside an object of colour k)."""
    c, t = _INKS_RGB[k], _TINTS_RGB[k]
    tc = t - c
    return np.clip(((img - c) * tc).sum(-1) / float(tc @ tc), 0.0, 1.0)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _along(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """a = ⟨d, e⟩ / ‖e‖² clipped to [0, 1]: how far each planar d reaches along e."""
    return np.clip(_dot(d, e) / np.maximum(_dot(e, e), 1e-6), 0.0, 1.0)


def _shape_descriptors(mask: np.ndarray, cover: np.ndarray) -> tuple[float, float, float]:
    """(solidity, extent, centroid height) of one component, on a sub-pixel mask: its
    coverage map upsampled (bilinear) to ~96 px across and cut at 0.5.

    solidity = area / convex-hull area; extent = area / minimum-area rectangle of the hull
    (rotation invariant); centroid height = centroid row within the mask's row span, from 0
    (top) to 1 (bottom): ½ for symmetric shapes, ⅔ for an upright triangle.
    """
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
    # the hull through pixel centres misses half a pixel all round; grown by a pixel square:
    # A' ≈ A + ½ P + 1 (Minkowski sum with a unit square; exact for axis-aligned edges)
    hull_area = shoelace + 0.5 * perim + 1.0
    # minimum-area enclosing rectangle: one side lies along a hull edge (rotating calipers)
    ang = np.arctan2(edges[:, 1], edges[:, 0])
    rot = np.stack([np.cos(ang), np.sin(ang)], 1)
    u = hull @ rot.T
    v = hull @ np.stack([-rot[:, 1], rot[:, 0]], 1).T
    rect = ((u.max(0) - u.min(0) + 1.0) * (v.max(0) - v.min(0) + 1.0)).min()
    return area / max(hull_area, 1e-9), area / max(rect, 1e-9), float(cy)


def _classify_shape(solidity: float, extent: float, height: float) -> str:
    """Shape from descriptors. Geometry (large sizes): circle (1, π/4, ½), square (1, 1, ½),
    upright triangle (1, ½, ⅔), star with inner/outer 0.45 (0.55, 0.39, 0.55); at 4–6 px
    anti-aliasing pulls every solidity towards 1 (star ~0.8) and extents towards 0.6–0.8, so
    the cuts sit between the measured small- and large-size values (docs/evaluation.md)."""
    if solidity < 0.88 and height < 0.59:
        return "star"
    if height >= 0.59 or extent < 0.70:
        return "triangle"
    return "square" if extent >= 0.89 else "circle"


def _attribute_features(
    mask: np.ndarray, patch: np.ndarray, k: int, ring_px: float, noise: float
) -> tuple[float, float, float, float]:
    """(mean s, std s, coherence, ring contrast) of the tint map s inside one object of colour
    k; the std is of the pattern alone, with the pixel noise σ taken out."""
    tint = _tint_map(patch, k)
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
    # noise in s = ⟨p − c, t − c⟩/‖t − c‖² has σ_s = σ / ‖t − c‖; σ_pattern² = std² − σ_s²
    s_noise = noise / float(np.linalg.norm(_TINTS_RGB[k] - _INKS_RGB[k]))
    std = math.sqrt(max(float(s_in.std()) ** 2 - s_noise**2, 0.0))
    return float(s_in.mean()), std, coherence, ring_contrast


def _classify_attribute(mean: float, std: float, coherence: float, ring: float) -> str:
    # cut-offs are ours, set between the measured clusters of clean renders at 128–512 px
    # (docs/evaluation.md lists them: plain sd 0, patterns sd ≥ 0.35, stripes coherence 1)
    if std >= 0.15:  # a resolved pattern of colour and tint
        return "striped" if coherence >= 0.5 else "dotted"
    if mean >= 0.6 and ring >= 0.3:
        return "outlined"  # tinted interior inside a ring of full colour
    return "plain" if mean < 0.3 else "tinted"


def _downsample(img: np.ndarray, limit: int) -> np.ndarray:
    """Block-mean an image whose shorter side exceeds `limit` by the largest integer factor
    that keeps it ≥ limit (a box filter keeps every pixel a blend of background and ink)."""
    f = min(img.shape[:2]) // limit
    if f < 2:
        return img
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].reshape(h // f, f, w // f, f, 3).mean((1, 3))


def _segment(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(label, cover, noise σ) of an image: background from the border, pixels labelled, then
    the background refitted on every pixel far from any object and the pixels labelled again."""
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


def detect(image: Image.Image | np.ndarray | torch.Tensor) -> list[Detection]:
    """Objects in an image: colour, shape and (from ATTRIBUTE_MIN_RESOLUTION up) attribute.

    Images above ANALYSIS_MAX px are analysed block-averaged to ≥ ANALYSIS_MAX px (every
    scenes detail is still resolved there); objects under MIN_AREA of the image are dropped.
    """
    full = to_array(image)
    if min(full.shape[:2]) < 16:
        raise ValueError(
            f"image of {full.shape[1]}×{full.shape[0]} px is too small to analyse (at least 16 px)"
        )
    resolve = min(full.shape[:2]) >= ATTRIBUTE_MIN_RESOLUTION
    img = _downsample(full, ANALYSIS_MAX)
    h, w, _ = img.shape
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
            out.append(
                Detection(
                    color,
                    _classify_shape(*shape),
                    _classify_attribute(*attr) if resolve else None,
                    (xs.start / w, ys.start / h, xs.stop / w, ys.stop / h),
                    area / (h * w),
                    *shape,
                    *attr,
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# Answering and scoring
# --------------------------------------------------------------------------------------------


def answer(question: Question, detections: Sequence[Detection]) -> bool | int:
    """The answer the image gives: entity → any match; count → number of matches;
    attribute → any match carrying the attribute."""
    matches = [d for d in detections if d.color == question.color and d.shape == question.shape]
    if question.kind == "entity":
        return bool(matches)
    if question.kind == "count":
        return len(matches)
    if question.kind == "attribute":
        return any(d.attribute == question.attribute for d in matches)
    raise ValueError(f"unknown question kind {question.kind!r}")


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
        return {
            "caption": self.caption,
            "resolution": self.resolution,
            "score": self.score,
            "all_correct": self.all_correct,
            "questions": [
                {**asdict(q), "answer": a, "correct": c}
                for q, a, c in zip(self.questions, self.answers, self.correct, strict=True)
            ],
            "detections": [asdict(d) for d in self.detections],
        }


def score_questions(
    questions: Sequence[Question],
    detections: Sequence[Detection],
    caption: str = "",
    resolution: int = 0,
) -> PromptResult:
    """Answer `questions` from `detections` and apply DSG's parent → child dependencies."""
    answers = [answer(q, detections) for q in questions]
    raw = {q.id: a == q.expected for q, a in zip(questions, answers, strict=True)}
    correct = [raw[q.id] and (q.parent is None or raw[q.parent]) for q in questions]
    return PromptResult(caption, resolution, list(questions), answers, correct, list(detections))


def score_image(
    image: Image.Image | np.ndarray | torch.Tensor,
    truth: Scene | dict | str,
    caption: str | None = None,
) -> PromptResult:
    """Detect objects in `image` and score them against the prompt's ground truth; `caption`
    (default: the scene's) is the prompt text the result is labelled with."""
    arr = to_array(image)
    scene = as_scene(truth)
    resolution = min(arr.shape[:2])
    return score_questions(
        make_questions(scene, resolution), detect(arr), caption or scene.caption, resolution
    )


def summarize(results: Iterable[PromptResult]) -> dict[str, Any]:
    """Aggregate scores: DSG score (mean prompt score), all-correct rate, accuracy per
    question kind, counting accuracy per number 1–5 and the count confusion matrix."""
    results = list(results)
    if not results:
        raise ValueError("summarize: no results")
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
    held_out = [
        r.score for r in results if any((q.color, q.shape) in HELD_OUT for q in r.questions)
    ]
    return {
        "prompts": len(results),
        "questions": n_questions,
        "dsg_score": float(np.mean([r.score for r in results])),
        "all_correct": float(np.mean([r.all_correct for r in results])),
        "question_accuracy": float(sum(sum(r.correct) for r in results) / max(n_questions, 1)),
        "held_out_dsg_score": float(np.mean(held_out)) if held_out else None,
        "held_out_prompts": len(held_out),
        "accuracy": {k: float(np.mean(v)) for k, v in sorted(per_kind.items())},
        "count_accuracy": {str(n): float(np.mean(per_count[n])) for n in sorted(per_count)},
        "count_confusion": {
            "true": list(range(1, MAX_COUNT + 1)),
            "predicted": [*map(str, range(MAX_COUNT + 1)), f"{MAX_COUNT + 1}+"],
            "matrix": confusion.tolist(),
        },
    }


# --------------------------------------------------------------------------------------------
# The built-in evaluation prompts
# --------------------------------------------------------------------------------------------

EVAL_SEED = 2**40 + 17  # a scenes seed no training run uses by default: unseen layouts


def scene_prompts(count: int, seed: int = EVAL_SEED) -> list[Scene]:
    """`count` evaluation scenes: half counting prompts (one colour + shape, counts 1–5 in
    equal numbers, as in the Gecko numerical split); of the other half, alternately a
    composition drawn like the training scenes but from EVAL_SEED, and one that asks for a
    (colour, shape) pair training never shows (scenes.HELD_OUT). Deterministic."""
    if count < 1:
        raise ValueError(f"scene_prompts: count must be >= 1, got {count}")
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
