"""FID, FD-DINOv2, CMMD and CLIPScore with cached reference statistics (docs/evaluation.md)."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from torch import Tensor

from greedygrow.atomic import atomic_write_bytes
from greedygrow.evaluate.features import (
    ClipFeatures,
    FeatureExtractor,
    WeightsUnavailableError,
    extract_features,
    load_extractor,
)

STATS_CACHE = Path.home() / ".cache" / "greedygrow" / "reference-stats"
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0  # Jayasumana et al. 2024: k bandwidth σ and 1000 · MMD²


@dataclass
class FeatureStats:
    """Mean and covariance (float64) of a feature set, optionally with the features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, feats: Tensor | np.ndarray, keep: bool = False) -> FeatureStats:
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need features [N>=2, D], got shape {x.shape}")
        kept = x.astype(np.float32) if keep else None
        return cls(x.mean(0), np.cov(x, rowvar=False), len(x), kept)

    def save(self, path: Path, meta: dict[str, str]) -> None:
        tensors = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            tensors["features"] = self.features
        atomic_write_bytes(path, safetensors_bytes(tensors, {**meta, "count": str(self.count)}))

    @classmethod
    def load(cls, path: Path) -> tuple[FeatureStats, dict[str, str]]:
        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
        return cls(t["mu"], t["sigma"], int(meta["count"]), t.get("features")), meta


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:40]


def reference_stats(
    extractor: FeatureExtractor,
    dataset_id: str,
    images: Callable[[], Iterable[Tensor]],
    cache_dir: str | os.PathLike | None = None,
    keep_features: bool = False,
    batch_size: int = 64,
) -> FeatureStats:
    """Reference statistics, cached per (dataset_id, extractor.id); `images()` runs on a miss."""
    cache = Path(cache_dir or STATS_CACHE)
    key = hashlib.sha1(f"{dataset_id}\0{extractor.id}".encode()).hexdigest()[:12]
    path = cache / f"{_slug(dataset_id)}--{_slug(extractor.id)}--{key}.safetensors"
    if path.is_file():
        stats, meta = FeatureStats.load(path)
        if meta.get("dataset") != dataset_id or meta.get("extractor") != extractor.id:
            raise RuntimeError(f"{path}: cache key collision ({meta}); delete the file")
        if stats.features is not None or not keep_features:
            return stats
    feats = extract_features(extractor, images(), batch_size)
    stats = FeatureStats.from_features(feats, keep=keep_features)
    stats.save(path, {"dataset": dataset_id, "extractor": extractor.id})
    return stats


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    # tr((Σ1 Σ2)^{1/2}) = Σ √eig(Σ1^{1/2} Σ2 Σ1^{1/2}): same spectrum, symmetric PSD
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^{1/2}
    m = r @ s2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        warnings.warn(f"Fréchet distance: eigh failed; adding {eps}·I to Σ1, Σ2", stacklevel=2)
        off = eps * np.eye(len(s1))
        tr_covmean = _trace_sqrt_product(s1 + off, s2 + off)
    diff = mu1 - mu2
    # FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr((Σ1 Σ2)^{1/2})  (Dowson & Landau 1982; Heusel 2017)
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def fid_from_features(x: Tensor | np.ndarray, y: Tensor | np.ndarray | FeatureStats) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N,D] (or y's stats)."""
    a = FeatureStats.from_features(x)
    b = y if isinstance(y, FeatureStats) else FeatureStats.from_features(y)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _kernel_sum(a: Tensor, b: Tensor, gamma: float, chunk: int = 2048) -> float:
    total = 0.0
    bn = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        ai = a[i : i + chunk]
        d2 = (ai * ai).sum(1)[:, None] + bn[None, :] - 2.0 * ai @ b.T
        total += torch.exp(-gamma * d2.clamp_min(0)).sum().item()
    return total


def cmmd(x: Tensor | np.ndarray, y: Tensor | np.ndarray, unbiased: bool = True) -> float:
    """CMMD = 1000 · MMD² (unbiased, or the reference code's V-statistic) in float64."""
    x, y = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (x, y))
    m, n = len(x), len(y)
    if unbiased and min(m, n) < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    gamma = 1.0 / (2.0 * CMMD_SIGMA**2)
    kxx, kyy, kxy = _kernel_sum(x, x, gamma), _kernel_sum(y, y, gamma), _kernel_sum(x, y, gamma)
    if not unbiased:
        # MMD²_b = Σ k(xi,xj)/m² + Σ k(yi,yj)/n² − 2 Σ k(xi,yj)/(mn)
        return CMMD_SCALE * (kxx / (m * m) + kyy / (n * n) - 2.0 * kxy / (m * n))
    # MMD²_u = Σ_{i≠j} k(xi,xj)/(m(m−1)) + Σ_{i≠j} k(yi,yj)/(n(n−1)) − 2 Σ k(xi,yj)/(mn), k(x,x)=1
    return CMMD_SCALE * ((kxx - m) / (m * (m - 1)) + (kyy - n) / (n * (n - 1)) - 2 * kxy / (m * n))


def clip_score(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIPScore [B]: 100 · max(cos(image, text), 0) (Hessel et al. 2021, w = 100)."""
    return 100.0 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp_min(0)


@dataclass
class Extractors:
    """The feature networks a report uses; any may be None (its metrics are then skipped)."""

    inception: FeatureExtractor | None = None
    dinov2: FeatureExtractor | None = None
    clip: ClipFeatures | None = None
    notes: dict[str, str] = field(default_factory=dict)  # kind -> why it is missing

    @classmethod
    def load(
        cls,
        inception: str | None = None,
        dinov2: str | None = None,
        clip: str | None = None,
        kinds: Iterable[str] = ("inception", "dinov2", "clip"),
        device: str = "cpu",
    ) -> Extractors:
        """Load each requested kind; missing weights are recorded in `notes`, not raised."""
        specs = {"inception": inception, "dinov2": dinov2, "clip": clip}
        out, notes = {}, {}
        for kind in kinds:
            try:
                out[kind] = load_extractor(kind, specs[kind], device)
            except WeightsUnavailableError as err:
                notes[kind] = str(err)
        return cls(**out, notes=notes)


def distribution_metrics(
    images: Tensor,
    prompts: list[str],
    extractors: Extractors,
    references: tuple[str, Callable[[], Iterable[Tensor]]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID, FD-DINOv2 and CMMD against `references`, CLIPScore against `prompts`, as available."""

    def refs(ext: FeatureExtractor, keep: bool = False) -> FeatureStats:
        return reference_stats(ext, *references, cache_dir, keep, batch_size)

    out: dict[str, float] = {}
    for name, ext in (("fid", extractors.inception), ("fd_dinov2", extractors.dinov2)):
        if ext is not None and references is not None:
            out[name] = fid_from_features(extract_features(ext, images, batch_size), refs(ext))
    if extractors.clip is not None:
        emb = extract_features(extractors.clip, images, batch_size)
        if references is not None:
            out["cmmd"] = cmmd(emb, refs(extractors.clip, keep=True).features)
        chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        text = torch.cat([extractors.clip.encode_text(c) for c in chunks])
        out["clip_score"] = float(clip_score(emb, text).mean())
    return out
