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
ink (an object colour or its light tint): p = B + a (ink − B). Steps: background from the image
border (robust plane fit, refitted on every background pixel), per-pixel ink by least residual,
connected components per colour, shape from rotation-invariant descriptors (solidity and
extent in the minimum-area rectangle of the convex hull, on a sub-pixel 0.5-coverage mask),
attribute from the tint map inside the object (mean, spread, structure-tensor coherence, and
the outline ring against the interior).
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

from greedygrow.data.scenes import COLORS, HELD_OUT, OUTLINE_WIDTH, SHAPES, TINT, Scene

ATTRIBUTE_MIN_RESOLUTION = 128
ANALYSIS_MAX = 512  # larger images are analysed block-averaged to at least this
MIN_CONTRAST = 0.1  # ‖p − B‖ below this is background (in [0, 1] RGB units)
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


def _plural(shape: str) -> str:
    return shape + "s"


def as_scene(truth: Scene | dict | str) -> Scene:
    """A Scene from a Scene, its ground-truth dict, or its JSON string."""
    if isinstance(truth, Scene):
        return truth
    if isinstance(truth, str):
        return Scene.from_json(truth)
    if isinstance(truth, dict):
        return Scene.from_dict(truth)
    raise TypeError(f"scene ground truth must be a Scene, dict or JSON string, not {type(truth)}")


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
        parent = f"e{i}"
        out.append(Question(parent, "entity", f"is there a {color} {shape}?", color, shape, True))
        out.append(
            Question(
                f"c{i}",
                "count",
                f"how many {color} {_plural(shape)} are there?",
                color,
                shape,
                n,
                parent=parent,
            )
        )
        if resolution >= ATTRIBUTE_MIN_RESOLUTION:
            for j, attr in enumerate(attributes.get((color, shape), [])):
                out.append(
                    Question(
                        f"a{i}.{j}",
                        "attribute",
                        f"is a {color} {shape} {attr}?",
                        color,
                        shape,
                        True,
                        attribute=attr,
                        parent=parent,
                    )
                )
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


def _terms(x: np.ndarray, y: np.ndarray, degree: int) -> list[np.ndarray]:
    """Polynomial terms 1, x, y (, x², xy, y²) of centred pixel coordinates."""
    one = np.ones(np.broadcast_shapes(x.shape, y.shape), dtype=np.float32)
    terms = [one, x + 0 * y, y + 0 * x]
    if degree == 2:
        terms += [x * x + 0 * y, x * y, y * y + 0 * x]
    return terms


def _fit_background(img: np.ndarray, use: np.ndarray, degree: int) -> np.ndarray:
    """Least-squares polynomial background (per channel) fitted on the pixels in `use`,
    refitted twice without outliers; returns B [H, W, 3] float32."""
    h, w, _ = img.shape
    ys, xs = np.nonzero(use)
    step = max(1, ys.size // 20000)  # a regular subsample is plenty for ≤ 6 terms
    ys, xs = ys[::step], xs[::step]
    a = np.stack(_terms((xs + 0.5) / w - 0.5, (ys + 0.5) / h - 0.5, degree), 1)
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
    gx = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5)[None, :]
    gy = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5)[:, None]
    terms = _terms(gx, gy, degree)
    coef = coef.astype(np.float32)
    return np.stack(
        [sum(t * c for t, c in zip(terms, coef[:, ch], strict=True)) for ch in range(3)], -1
    )


@dataclass
class _PixelMaps:
    label: np.ndarray  # int colour index per pixel, −1 = background / unexplained
    cover: np.ndarray  # object coverage in [0, 1] (0.5 = halfway to the colour's tint)


def _label_pixels(img: np.ndarray, bg: np.ndarray, noise: float) -> _PixelMaps:
    """Each pixel as B + a (ink − B) for the best of the colour and tint inks.

    Only pixels significantly far from the background are fitted: ‖p − B‖ above MIN_CONTRAST
    (half the way from any background to the nearest tint is more than twice that) and above
    2·√3·σ (σ the per-channel noise: pure noise passes with probability < 1%, so a noise image
    yields no objects).
    """
    h, w, _ = img.shape
    d_all = img - bg
    threshold = max(MIN_CONTRAST, 2.0 * math.sqrt(3.0) * noise)
    idx = np.flatnonzero((d_all * d_all).sum(-1) > threshold**2)
    label = np.full(h * w, -1, dtype=np.int64)
    cover = np.zeros(h * w, dtype=np.float32)
    if idx.size:
        d = d_all.reshape(-1, 3)[idx].T  # planar [3, N]: channel sums stay vectorised
        b = bg.reshape(-1, 3)[idx].T
        best = np.full(idx.size, np.inf, dtype=np.float32)
        lab = np.zeros(idx.size, dtype=np.int64)
        cov = np.zeros(idx.size, dtype=np.float32)
        for k in range(len(_INKS_RGB)):
            et = _TINTS_RGB[k][:, None] - b
            for ink in (_INKS_RGB[k], _TINTS_RGB[k]):
                e = ink[:, None] - b  # direction from the background to the ink, per pixel
                # p = B + a (ink − B), a = ⟨d, e⟩ / ‖e‖² clipped to [0, 1]; residual ‖d − a e‖
                a = np.clip(_dot(d, e) / np.maximum(_dot(e, e), 1e-6), 0.0, 1.0)
                r = d - a * e
                res = _dot(r, r)
                better = res < best
                best = np.where(better, res, best)
                lab = np.where(better, k, lab)
                # coverage measured towards the tint: a tint pixel is fully covered (1)
                ct = np.clip(_dot(d, et) / np.maximum(_dot(et, et), 1e-6), 0.0, 1.0)
                cov = np.where(better, ct, cov)
        dist = np.sqrt(_dot(d, d))
        # a blend of B and one palette ink, up to noise (capped: noise is no licence);
        # residual < 0.08 + 0.35·dist + 3·min(noise, 0.05): ours, tuned on renders with noise
        # and blur (docs/evaluation.md, "How far to trust it")
        explained = np.sqrt(best) < 0.08 + 0.35 * dist + 3 * min(noise, 0.05)
        lab = np.where(explained & (cov >= 0.5), lab, -1)
        label[idx], cover[idx] = lab, cov
    return _PixelMaps(label.reshape(h, w), cover.reshape(h, w))


def _tint_map(img: np.ndarray, k: int) -> np.ndarray:
    """s = ⟨p − c, t − c⟩ / ‖t − c‖² ∈ [0, 1]: 0 at colour k, 1 at its tint (for pixels fully
    inside an object of colour k)."""
    c, t = _INKS_RGB[k], _TINTS_RGB[k]
    tc = t - c
    return np.clip(((img - c) * tc).sum(-1) / float(tc @ tc), 0.0, 1.0)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


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
    # shoelace: A = ½ |Σ x_i y_{i−1} − y_i x_{i−1}|
    shoelace = 0.5 * abs(
        np.dot(hull[:, 0], np.roll(hull[:, 1], 1)) - np.dot(hull[:, 1], np.roll(hull[:, 0], 1))
    )
    perim = np.linalg.norm(np.roll(hull, -1, 0) - hull, axis=1).sum()
    # the hull through pixel centres misses half a pixel all round; grown by a pixel square:
    # A' ≈ A + ½ P + 1 (Minkowski sum with a unit square; exact for axis-aligned edges)
    hull_area = shoelace + 0.5 * perim + 1.0
    # minimum-area enclosing rectangle: one side lies along a hull edge (rotating calipers)
    edges = np.roll(hull, -1, 0) - hull
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
    mask: np.ndarray, tint: np.ndarray, ring_px: float
) -> tuple[float, float, float, float]:
    """(mean s, std s, coherence, ring contrast) of the tint map s inside one object."""
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
    return float(s_in.mean()), float(s_in.std()), coherence, ring_contrast


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


def detect(
    image: Image.Image | np.ndarray | torch.Tensor, min_area: float = 0.0015
) -> list[Detection]:
    """Objects in an image: colour, shape and (from ATTRIBUTE_MIN_RESOLUTION up) attribute.

    Images above ANALYSIS_MAX px are analysed block-averaged to ≥ ANALYSIS_MAX px (every
    scenes detail is still resolved there). min_area: smallest object kept, as a fraction of
    the image area (smaller specks are noise).
    """
    full = to_array(image)
    if min(full.shape[:2]) < 16:
        raise ValueError(
            f"image of {full.shape[1]}×{full.shape[0]} px is too small to analyse (at least 16 px)"
        )
    resolve = min(full.shape[:2]) >= ATTRIBUTE_MIN_RESOLUTION
    img = _downsample(full, ANALYSIS_MAX)
    h, w, _ = img.shape
    res = min(h, w)
    b = max(1, round(0.015 * res))
    border = np.zeros((h, w), dtype=bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    bg = _fit_background(img, border, degree=1)
    noise = float(1.4826 * np.median(np.abs(img[border] - bg[border])))  # per-channel σ (MAD)
    maps = _label_pixels(img, bg, noise)
    # refit the background on every pixel far from any object, then label again
    far = ~ndimage.binary_dilation(maps.label >= 0, iterations=2)
    if far.sum() > 0.1 * far.size:
        bg = _fit_background(img, far, degree=2)
        maps = _label_pixels(img, bg, noise)
    ring_px = max(1.0, OUTLINE_WIDTH * res)
    out = []
    for k, color in enumerate(_COLOR_NAMES):
        comps, _ = ndimage.label(maps.label == k, structure=np.ones((3, 3)))
        # noise in s = ⟨p − c, t − c⟩/‖t − c‖² has σ_s = σ / ‖t − c‖
        s_noise = noise / float(np.linalg.norm(_TINTS_RGB[k] - _INKS_RGB[k]))
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            pad = tuple(slice(max(q.start - 2, 0), q.stop + 2) for q in sl)
            mask = comps[pad] == i
            area = float(maps.cover[pad][mask].sum())
            if area < max(min_area * h * w, 3.0):
                continue
            solidity, extent, height = _shape_descriptors(
                ndimage.binary_dilation(mask), maps.cover[pad]
            )
            mean, std, coherence, ring = _attribute_features(
                ndimage.binary_fill_holes(mask), _tint_map(img[pad], k), ring_px
            )
            std = math.sqrt(max(std * std - s_noise * s_noise, 0.0))  # pattern, not noise
            ys, xs = np.nonzero(mask)
            y0, x0 = ys.min() + pad[0].start, xs.min() + pad[1].start
            y1, x1 = ys.max() + pad[0].start + 1, xs.max() + pad[1].start + 1
            out.append(
                Detection(
                    color=color,
                    shape=_classify_shape(solidity, extent, height),
                    attribute=_classify_attribute(mean, std, coherence, ring) if resolve else None,
                    box=(x0 / w, y0 / h, x1 / w, y1 / h),
                    area=area / (h * w),
                    solidity=solidity,
                    extent=extent,
                    height=height,
                    tint_mean=mean,
                    tint_std=std,
                    coherence=coherence,
                    ring_contrast=ring,
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
        if any(d.attribute is None for d in matches):
            raise ValueError(
                f"{question.text!r}: attributes are not resolvable below "
                f"{ATTRIBUTE_MIN_RESOLUTION} px; make_questions does not ask them"
            )
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
    from greedygrow.data.scenes import Group, make_scene, sample_scene

    if count < 1:
        raise ValueError(f"scene_prompts: count must be >= 1, got {count}")
    rng = np.random.default_rng([seed, 0xC0])
    attrs = ["plain", "plain", "striped", "dotted", "outlined"]
    scenes = []
    for i in range(count):
        if i % 2 == 0:
            n = (i // 2) % MAX_COUNT + 1
            g = Group(
                _COLOR_NAMES[rng.integers(len(_COLOR_NAMES))],
                SHAPES[rng.integers(len(SHAPES))],
                attrs[rng.integers(len(attrs))],
                n,
            )
            scenes.append(
                make_scene(
                    [g],
                    seed=int(rng.integers(2**31)),
                    background=["white", "light grey", "cream"][i % 3],
                )
            )
        elif i % 4 == 3:
            color, shape = sorted(HELD_OUT)[(i // 4) % len(HELD_OUT)]
            held = Group(color, shape, attrs[rng.integers(len(attrs))], int(rng.integers(1, 4)))
            scenes.append(make_scene([held], seed=int(rng.integers(2**31))))
        else:
            scenes.append(sample_scene(seed, i))
    return scenes
