"""Distribution metrics: FID, FD-DINOv2, CMMD and CLIPScore, with cached reference statistics.

Every metric sees images through a `FeatureExtractor`: an nn.Module that maps images
[B,3,H,W] in [-1,1] to features [B,D] and carries a stable `id` (the cache key) and `dim`.
Three real extractors are provided, each loaded from local weights or a Hugging Face hub
name, never downloaded behind the user's back:

- `InceptionFID`: the FID InceptionV3 (TF "2015-12-05" graph as ported by pytorch-fid), built
  here in plain PyTorch (torchvision is not a dependency) and loaded from a local
  `.safetensors` or `.pth` state dict (read with `weights_only=True`); 2048-d pool features.
- `DinoV2Features`: `transformers.Dinov2Model`, CLS token after the final norm (FD-DINOv2,
  Stein et al. 2023, ViT-L/14 at 224 px).
- `ClipFeatures`: `transformers.CLIPModel` projected image/text embeddings (CMMD, Jayasumana
  et al. 2024, ViT-L/14@336; CLIPScore, Hessel et al. 2021).

Tests build the same classes around small randomly initialised networks, so the whole
pipeline runs without downloaded weights.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file as load_torch_file
from torch import Tensor, nn

from greedygrow.text import ALLOW_DOWNLOAD_ENV, downloads_allowed

INCEPTION_ENV = "GREEDYGROW_INCEPTION"
INCEPTION_DEFAULT = Path.home() / ".cache" / "greedygrow" / "pt_inception-2015-12-05.safetensors"
DINOV2_DEFAULT = "facebook/dinov2-large"
CLIP_DEFAULT = "openai/clip-vit-large-patch14-336"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """A feature network's weights are neither on disk nor loadable from the hub."""


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """Images [B,3,H,W] in [-1,1] → features [B,dim] float32; `id` keys the reference cache."""

    id: str
    dim: int

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.id}: expected images [B,3,H,W], got {tuple(images.shape)}")
        device = next(self.parameters()).device
        return self.features(images.to(device, torch.float32)).float()


def resize_crop(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resize the shorter side to `size` (antialiased) and centre-crop to size×size."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(
            images,
            size=(nh, nw),
            mode=mode,
            align_corners=False,
            antialias=mode in ("bilinear", "bicubic"),
        )
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size]


def _normalize(images01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, device=images01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images01.device).view(1, 3, 1, 1)
    return (images01 - m) / s


class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps 1e-3) → ReLU; attribute names match the ported weights."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # the TF graph's 3×3 average pool ignores padding (count_include_pad=False)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class _BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        d = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            d = layer(d)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                d,
                self.branch_pool(_avg3(x)),
            ],
            1,
        )


class _BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b = x
        for layer in (
            self.branch7x7x3_1,
            self.branch7x7x3_2,
            self.branch7x7x3_3,
            self.branch7x7x3_4,
        ):
            b = layer(b)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1
        )


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the last block of the TF graph max-pools its pool branch
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionFID(FeatureExtractor):
    """The FID InceptionV3: images resized to 299 (bilinear) → 2048-d pool3 features.

    Parameter names follow the pytorch-fid port of TF's inception-2015-12-05 so its state dict
    (`pt_inception-2015-12-05-6726825d.pth`) loads as is (the 1008-way `fc` is not needed).
    """

    dim = 2048

    def __init__(self, id: str = "inception-v3-fid") -> None:
        super().__init__()
        self.id = id
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.eval()

    def features(self, images: Tensor) -> Tensor:
        # pytorch-fid feeds [-1,1] images resized to 299×299 bilinearly, as ours already are
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InceptionFID:
        """Load ported FID weights from a `.safetensors` or a `.pth` state dict."""
        path = Path(path)
        if not path.is_file():
            raise WeightsUnavailableError(_inception_help(f"no file at {path}"))
        if path.suffix == ".safetensors":
            state = load_torch_file(str(path))
        else:  # a plain state dict of tensors: safe to read with weights_only
            state = torch.load(path, map_location="cpu", weights_only=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        model = cls(id=f"inception-v3-fid@{digest}")
        wanted = model.state_dict()
        state = {k: v for k, v in state.items() if k in wanted}
        missing = sorted(set(wanted) - set(state) - {k for k in wanted if "num_batches" in k})
        if missing:
            raise WeightsUnavailableError(
                f"{path} is not an FID InceptionV3 state dict: {len(missing)} tensors missing, "
                f"e.g. {missing[:3]}. " + _inception_help("wrong file")
            )
        model.load_state_dict(state, strict=False)
        return model.eval()


def _inception_help(problem: str) -> str:
    return (
        f"FID needs the FID InceptionV3 weights ({problem}). Get "
        "pt_inception-2015-12-05-6726825d.pth from the pytorch-fid GitHub releases on a "
        "machine with network, then pass its path (--inception PATH, .pth or .safetensors) "
        f"or set {INCEPTION_ENV}=PATH, or copy it to {INCEPTION_DEFAULT}. "
        "convert_inception_weights(pth, out) writes the safetensors version."
    )


def convert_inception_weights(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert pytorch-fid's `.pth` state dict to safetensors (read with weights_only=True)."""
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))


class DinoV2Features(FeatureExtractor):
    """DINOv2 CLS token (after the final LayerNorm) at 224 px, ImageNet normalisation."""

    def __init__(self, model: nn.Module, id: str, image_size: int = 224) -> None:
        super().__init__()
        self.model, self.id, self.image_size = model.eval(), id, image_size
        self.dim = int(model.config.hidden_size)

    def features(self, images: Tensor) -> Tensor:
        x = resize_crop(images, self.image_size).add(1).div(2).clamp(0, 1)
        return self.model(pixel_values=_normalize(x, IMAGENET_MEAN, IMAGENET_STD)).pooler_output


Tokenize = Callable[[list[str]], tuple[Tensor, Tensor]]


class ClipFeatures(FeatureExtractor):
    """CLIP projected image embeddings (unit norm); `encode_text` gives the text side."""

    def __init__(self, model: nn.Module, tokenize: Tokenize, id: str) -> None:
        super().__init__()
        self.model, self.tokenize, self.id = model.eval(), tokenize, id
        self.dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)

    def features(self, images: Tensor) -> Tensor:
        x = resize_crop(images, self.image_size).add(1).div(2).clamp(0, 1)
        pooled = self.model.vision_model(pixel_values=_normalize(x, CLIP_MEAN, CLIP_STD))
        return F.normalize(self.model.visual_projection(pooled.pooler_output), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        """Unit-norm text embeddings [B,dim]."""
        device = next(self.parameters()).device
        ids, mask = self.tokenize(captions)
        pooled = self.model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return F.normalize(self.model.text_projection(pooled.pooler_output), dim=-1).float()


def _hf_load(cls_name: str, spec: str, what: str, flag: str, local_files_only: bool):
    import transformers

    local = Path(spec).exists()
    try:
        return getattr(transformers, cls_name).from_pretrained(
            spec, local_files_only=local_files_only or local
        )
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"{what} needs the weights '{spec}', which are not a local folder and could not be "
            f"loaded from the Hugging Face cache{'' if local_files_only else ' or hub'} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). On a machine with network "
            f"run `hf download {spec}` (or save_pretrained to a folder) and pass {flag} PATH, "
            f"or set {ALLOW_DOWNLOAD_ENV}=1 to let greedygrow download it."
        ) from err


def load_extractor(
    kind: str, spec: str | None = None, device: str = "cpu", local_files_only: bool | None = None
) -> FeatureExtractor:
    """Load "inception", "dinov2" or "clip" from a local path or hub name (defaults per kind).

    Hub names are read from the local Hugging Face cache only, unless local_files_only=False
    or GREEDYGROW_ALLOW_DOWNLOAD=1 (as for text encoders). Raises WeightsUnavailableError
    naming what is missing and how to provide it.
    """
    if local_files_only is None:
        local_files_only = not downloads_allowed()
    if kind == "inception":
        path = spec or os.environ.get(INCEPTION_ENV) or str(INCEPTION_DEFAULT)
        return InceptionFID.from_file(path).to(device)
    if kind == "dinov2":
        name = spec or DINOV2_DEFAULT
        model = _hf_load("Dinov2Model", name, "FD-DINOv2", "--dino", local_files_only)
        return DinoV2Features(model, id=f"dinov2:{Path(name).name}").to(device)
    if kind == "clip":
        name = spec or CLIP_DEFAULT
        model = _hf_load("CLIPModel", name, "CMMD/CLIPScore", "--clip", local_files_only)
        tok = _hf_load("AutoTokenizer", name, "CMMD/CLIPScore", "--clip", local_files_only)
        max_len = int(model.config.text_config.max_position_embeddings)

        def tokenize(captions: list[str]) -> tuple[Tensor, Tensor]:
            out = tok(
                captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            return out["input_ids"], out["attention_mask"]

        return ClipFeatures(model, tokenize, id=f"clip:{Path(name).name}").to(device)
    raise ValueError(f"unknown feature extractor kind {kind!r}: use inception, dinov2 or clip")


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: Iterable[Tensor] | Tensor, batch_size: int = 64
) -> Tensor:
    """Features [N,dim] float32 on CPU for a tensor [N,3,H,W] or an iterable of batches."""
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    out = [extractor(b).cpu() for b in batches if len(b)]
    if not out:
        raise ValueError(f"{extractor.id}: no images to extract features from")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Statistics and distances
# --------------------------------------------------------------------------------------------


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
        return cls(
            x.mean(0),
            np.cov(x, rowvar=False),
            len(x),
            np.asarray(feats, dtype=np.float32) if keep else None,
        )

    def save(self, path: Path, meta: dict[str, str]) -> None:
        tensors = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            tensors["features"] = self.features
        tmp = path.with_suffix(".tmp")
        save_numpy_file(tensors, str(tmp), metadata={**meta, "count": str(self.count)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> tuple[FeatureStats, dict[str, str]]:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
        t = load_numpy_file(str(path))
        return cls(t["mu"], t["sigma"], int(meta["count"]), t.get("features")), meta


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:40]


def reference_stats(
    extractor: FeatureExtractor,
    dataset_id: str,
    images: Callable[[], Iterable[Tensor]],
    cache_dir: str | os.PathLike,
    keep_features: bool = False,
    batch_size: int = 64,
) -> FeatureStats:
    """Reference statistics, computed once per (dataset_id, extractor.id) and cached.

    `images()` yields batches [B,3,H,W] in [-1,1]; it is only called on a cache miss (or when
    features are wanted but the cached file holds only the moments).
    """
    cache = Path(cache_dir)
    key = hashlib.sha1(f"{dataset_id}\0{extractor.id}".encode()).hexdigest()[:12]
    path = cache / f"{_slug(dataset_id)}--{_slug(extractor.id)}--{key}.safetensors"
    if path.is_file():
        stats, meta = FeatureStats.load(path)
        if meta.get("dataset") != dataset_id or meta.get("extractor") != extractor.id:
            raise RuntimeError(f"{path}: cache key collision ({meta}); delete the file")
        if stats.features is not None or not keep_features:
            return stats
    stats = FeatureStats.from_features(
        extract_features(extractor, images(), batch_size), keep=keep_features
    )
    cache.mkdir(parents=True, exist_ok=True)
    stats.save(path, {"dataset": dataset_id, "extractor": extractor.id})
    return stats


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr((Σ1 Σ2)^{1/2}) is computed as Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})), a symmetric PSD matrix
    with the same spectrum, so nearly singular covariances are handled without complex parts.
    If an eigen-decomposition fails, eps·I is added to both covariances (as pytorch-fid does).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    try:
        r = _psd_sqrt(s1)
        m = r @ s2 @ r
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    except np.linalg.LinAlgError:
        warnings.warn(
            f"Fréchet distance: eigh failed; adding {eps}·I to the covariances", stacklevel=2
        )
        off = eps * np.eye(len(s1))
        r = _psd_sqrt(s1 + off)
        m = r @ (s2 + off) @ r
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    # FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr((Σ1 Σ2)^{1/2})  (Dowson & Landau 1982; Heusel 2017)
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def fid_from_features(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N,D], [M,D]."""
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _kernel_sum(a: Tensor, b: Tensor, gamma: float, chunk: int = 2048) -> float:
    total = 0.0
    bn = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        ai = a[i : i + chunk]
        d2 = (ai * ai).sum(1)[:, None] + bn[None, :] - 2.0 * ai @ b.T
        total += torch.exp(-gamma * d2.clamp_min(0)).sum().item()
    return total


def mmd2(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, sigma: float = 10.0, unbiased: bool = True
) -> float:
    """Squared MMD with the Gaussian kernel k(a,b) = exp(−‖a−b‖²/(2σ²)), in float64.

    unbiased=True is the unbiased estimator MMD²_u of the CMMD paper (Gretton et al. 2012):
    within-set sums skip i = j, the cross sum is complete, so the value does not depend on how
    the two sets are ordered; a set against itself gives −2 (1 − mean off-diagonal k) / m, not 0.
    unbiased=False is the V-statistic of the CMMD reference code; the two differ by O(1/m).
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    m, n = len(x), len(y)
    if unbiased and min(m, n) < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = _kernel_sum(x, x, gamma), _kernel_sum(y, y, gamma), _kernel_sum(x, y, gamma)
    if not unbiased:
        # MMD²_b = Σ k(xi,xj)/m² + Σ k(yi,yj)/n² − 2 Σ k(xi,yj)/(mn)
        return kxx / (m * m) + kyy / (n * n) - 2.0 * kxy / (m * n)
    # MMD²_u = Σ_{i≠j} k(xi,xj)/(m(m−1)) + Σ_{i≠j} k(yi,yj)/(n(n−1)) − 2 Σ k(xi,yj)/(mn)
    # (k(x,x) = 1 on the diagonals)
    return (kxx - m) / (m * (m - 1)) + (kyy - n) / (n * (n - 1)) - 2.0 * kxy / (m * n)


def cmmd(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    sigma: float = 10.0,
    scale: float = 1000.0,
    unbiased: bool = True,
) -> float:
    """CMMD = 1000 · MMD² between CLIP embeddings, σ = 10 (Jayasumana et al. 2024)."""
    return scale * mmd2(x, y, sigma=sigma, unbiased=unbiased)


def clip_score(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIPScore [B]: 100 · max(cos(image, text), 0)."""
    # CLIPScore = 100 · max(cos(E_I, E_T), 0)  (Hessel et al. 2021, with w = 100)
    return 100.0 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp_min(0)


# --------------------------------------------------------------------------------------------
# All metrics for one set of generated images
# --------------------------------------------------------------------------------------------


@dataclass
class Extractors:
    """The feature networks a report uses; any may be None (its metrics are then skipped)."""

    inception: FeatureExtractor | None = None
    dinov2: FeatureExtractor | None = None
    clip: ClipFeatures | None = None
    notes: dict[str, str] | None = None  # kind -> why it is missing

    @classmethod
    def load(
        cls,
        inception: str | None = None,
        dinov2: str | None = None,
        clip: str | None = None,
        kinds: Iterable[str] = ("inception", "dinov2", "clip"),
        device: str = "cpu",
        local_files_only: bool | None = None,
    ) -> Extractors:
        """Load each requested kind; a kind whose weights are unavailable is recorded in
        `notes` with the loader's message instead of raising."""
        specs = {"inception": inception, "dinov2": dinov2, "clip": clip}
        out, notes = {}, {}
        for kind in kinds:
            try:
                out[kind] = load_extractor(kind, specs[kind], device, local_files_only)
            except WeightsUnavailableError as err:
                notes[kind] = str(err)
        return cls(**out, notes=notes)


def distribution_metrics(
    images: Tensor,
    prompts: list[str] | None,
    extractors: Extractors,
    references: Callable[[], Iterable[Tensor]] | None = None,
    reference_id: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID / FD-DINOv2 / CMMD against `references` and CLIPScore against `prompts`.

    Metrics whose extractor (or reference set) is missing are left out of the result.
    """
    out: dict[str, float] = {}
    have_refs = references is not None
    if have_refs and (reference_id is None or cache_dir is None):
        raise ValueError("references need a reference_id and a cache_dir for their statistics")
    for name, ext in (("fid", extractors.inception), ("fd_dinov2", extractors.dinov2)):
        if ext is None or not have_refs:
            continue
        gen = FeatureStats.from_features(extract_features(ext, images, batch_size))
        ref = reference_stats(ext, reference_id, references, cache_dir, batch_size=batch_size)
        out[name] = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    if extractors.clip is not None:
        emb = extract_features(extractors.clip, images, batch_size)
        if have_refs:
            ref = reference_stats(
                extractors.clip,
                reference_id,
                references,
                cache_dir,
                keep_features=True,
                batch_size=batch_size,
            )
            out["cmmd"] = cmmd(emb, ref.features)
        if prompts is not None:
            if len(prompts) != len(images):
                raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
            text = torch.cat(
                [
                    extractors.clip.encode_text(list(prompts[i : i + batch_size]))
                    for i in range(0, len(prompts), batch_size)
                ]
            )
            out["clip_score"] = float(clip_score(emb, text).mean())
    return out
