"""Feature networks for the distribution metrics: local weights, never a silent download."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from greedygrow.text import ALLOW_DOWNLOAD_ENV, downloads_allowed

INCEPTION_ENV = "GREEDYGROW_INCEPTION"
INCEPTION_DEFAULT = Path.home() / ".cache" / "greedygrow" / "pt_inception-2015-12-05.safetensors"
DINOV2_DEFAULT = "facebook/dinov2-large"
CLIP_DEFAULT = "openai/clip-vit-large-patch14-336"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """A feature network's weights are neither on disk nor loadable from the hub."""


class FeatureExtractor(nn.Module):
    """Images [B,3,H,W] in [-1,1] → features [B,dim] float32; `id` keys the reference cache."""

    id: str
    dim: int

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.parameters()).device
        return self.features(images.to(device, torch.float32)).float()


def _pixel_values(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[-1,1] images, shorter side resized (bicubic) and centre-cropped to size, normalised."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, (nh, nw), mode="bicubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = images[..., top : top + size, left : left + size].add(1).div(2).clamp(0, 1)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    return (x - m) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)


class _ConvBN(nn.Module):
    """conv (no bias) → BatchNorm(eps 1e-3) → ReLU; attribute names match the ported weights."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


# (kernel, stride, padding) of the convs in the blocks; stride 1 and no padding by default
_1, _3, _5, _3S2 = (1,), (3, 1, 1), (5, 1, 2), (3, 2)  # _3S2: a valid 3×3 that halves the map
_R3, _C3 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))  # a 3×3 factorised into a row and a column
_R7, _C7 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # the same for 7×7


class _Mixed(nn.Module):
    """An Inception block: conv chains named like the port's (prefix_1…n, a lone conv prefix, a
    fork of two prefix_na, _nb), with a 1×1 and a 1×1 on a pool if `out1`, else a max pool."""

    def __init__(
        self, cin: int, chains: list, out1: int = 0, pool: int = 0, max_pool: bool = False
    ) -> None:
        super().__init__()
        self.max_pool, self.branches = max_pool, []
        # the TF graph's average pools ignore padding; its last block max-pools instead
        self.pool = F.max_pool2d if max_pool else partial(F.avg_pool2d, count_include_pad=False)
        ends = [("branch1x1", [out1], [_1]), *chains, ("branch_pool", [pool], [_1])]
        for prefix, channels, specs, *fork in ends if out1 else chains:
            n = len(specs) - 2 * len(fork)  # convs before the fork
            names = [prefix] if len(specs) == 1 else [f"{prefix}_{i + 1}" for i in range(n)]
            tails = [f"{prefix}_{n + 1}{t}" for t in "ab"] if fork else []
            chans = [cin, *channels]
            for i, name in enumerate(names + tails):
                j = min(i, n)  # both convs of a fork read the chain's output
                self.add_module(name, _ConvBN(chans[j], chans[j + 1], *specs[i]))
            self.branches.append((names, tails))

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for names, tails in self.branches:
            y = self.pool(x, 3, stride=1, padding=1) if names == ["branch_pool"] else x
            for name in names:
                y = getattr(self, name)(y)
            outs += [getattr(self, t)(y) for t in tails] or [y]
        if "branch_pool" not in self._modules:
            outs.append(F.max_pool2d(x, 3, stride=2))
        return torch.cat(outs, 1)


def _block_a(cin: int, pool: int) -> _Mixed:
    b5, b3 = ("branch5x5", [48, 64], [_1, _5]), ("branch3x3dbl", [64, 96, 96], [_1, _3, _3])
    return _Mixed(cin, [b5, b3], 64, pool)


def _block_c(cin: int, c7: int) -> _Mixed:
    b7 = ("branch7x7", [c7, c7, 192], [_1, _R7, _C7])
    dbl = ("branch7x7dbl", [c7, c7, c7, c7, 192], [_1, _C7, _R7, _C7, _R7])
    return _Mixed(cin, [b7, dbl], 192, 192)


def _block_e(cin: int, max_pool: bool) -> _Mixed:
    b3 = ("branch3x3", [384, 384], [_1, _R3, _C3], "fork")
    dbl = ("branch3x3dbl", [448, 384, 384], [_1, _3, _R3, _C3], "fork")
    return _Mixed(cin, [b3, dbl], 320, 192, max_pool)


class InceptionFID(FeatureExtractor):
    """The FID InceptionV3 (2048-d pool3), named so pytorch-fid's state dict loads as is."""

    dim = 2048

    def __init__(self, id: str = "inception-v3-fid") -> None:
        super().__init__()
        self.id = id
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, *_3S2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)  # valid: the stem does not pad
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, *_3)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, *_1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        b3, dbl = ("branch3x3", [384], [_3S2]), ("branch3x3dbl", [64, 96, 96], [_1, _3, _3S2])
        self.Mixed_6a = _Mixed(288, [b3, dbl])
        self.Mixed_6b = _block_c(768, 128)
        self.Mixed_6c = _block_c(768, 160)
        self.Mixed_6d = _block_c(768, 160)
        self.Mixed_6e = _block_c(768, 192)
        b7 = ("branch7x7x3", [192] * 4, [_1, _R7, _C7, _3S2])
        self.Mixed_7a = _Mixed(768, [("branch3x3", [192, 320], [_1, _3S2]), b7])
        self.Mixed_7b = _block_e(1280, max_pool=False)
        self.Mixed_7c = _block_e(2048, max_pool=True)
        self.eval()

    def features(self, images: Tensor) -> Tensor:
        # pytorch-fid feeds [-1,1] images resized to 299×299 bilinearly, as ours already are
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        for name, layer in self.named_children():  # in the order __init__ adds them
            x = layer(x)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                x = F.max_pool2d(x, 3, stride=2)  # the stem's two max pools
        return x.mean(dim=(2, 3))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> InceptionFID:
        """Load ported FID weights from a `.safetensors` or a `.pth` state dict."""
        path = Path(path)
        if not path.is_file():
            raise WeightsUnavailableError(_inception_help(f"no file at {path}"))
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:  # a plain state dict of tensors: safe to read with weights_only
            state = torch.load(path, map_location="cpu", weights_only=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        model = cls(id=f"inception-v3-fid@{digest}")
        loaded = model.load_state_dict(state, strict=False)  # the 1008-way fc is left out
        missing = [k for k in loaded.missing_keys if "num_batches" not in k]
        if missing:
            raise WeightsUnavailableError(
                f"{path} is not an FID InceptionV3 state dict: {len(missing)} tensors missing, "
                f"e.g. {missing[:3]}. " + _inception_help("wrong file")
            )
        return model


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
    state = torch.load(src, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))


class DinoV2Features(FeatureExtractor):
    """DINOv2 CLS token (after the final LayerNorm) at 224 px, ImageNet normalisation."""

    def __init__(self, model: nn.Module, id: str, image_size: int = 224) -> None:
        super().__init__()
        self.model, self.id, self.image_size = model.eval(), id, image_size
        self.dim = int(model.config.hidden_size)

    def features(self, images: Tensor) -> Tensor:
        x = _pixel_values(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return self.model(pixel_values=x).pooler_output


Tokenize = Callable[[list[str]], tuple[Tensor, Tensor]]


class ClipFeatures(FeatureExtractor):
    """CLIP projected image embeddings (unit norm); `encode_text` gives the text side."""

    def __init__(self, model: nn.Module, tokenize: Tokenize, id: str) -> None:
        super().__init__()
        self.model, self.tokenize, self.id = model.eval(), tokenize, id
        self.dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)

    def features(self, images: Tensor) -> Tensor:
        x = _pixel_values(images, self.image_size, CLIP_MEAN, CLIP_STD)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        """Unit-norm text embeddings [B,dim]."""
        device = next(self.parameters()).device
        ids, mask = self.tokenize(captions)
        pooled = self.model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return F.normalize(self.model.text_projection(pooled.pooler_output), dim=-1).float()


def _hf_load(cls_name: str, spec: str, what: str, flag: str, local_files_only: bool):
    local = local_files_only or Path(spec).exists()
    try:
        if local and not Path(spec).exists() and not _hf_cached(spec):
            # fail before importing the model's code, which alone takes seconds
            raise OSError(f"{spec} is not in the local Hugging Face cache")
        import transformers

        return getattr(transformers, cls_name).from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"{what} needs the weights '{spec}', which are not a local folder and could not be "
            f"loaded from the Hugging Face cache{'' if local_files_only else ' or hub'} "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). On a machine with network "
            f"run `hf download {spec}` (or save_pretrained to a folder) and pass {flag} PATH, "
            f"or set {ALLOW_DOWNLOAD_ENV}=1 to let greedygrow download it."
        ) from err


def _hf_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds `repo_id`'s config.json."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_extractor(
    kind: str, spec: str | None = None, device: str = "cpu", local_files_only: bool | None = None
) -> FeatureExtractor:
    """Load "inception", "dinov2" or "clip" from a local path or hub name (defaults per kind)."""
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


def extract_features(
    extractor: FeatureExtractor, images: Iterable[Tensor] | Tensor, batch_size: int = 64
) -> Tensor:
    """Features [N,dim] float32 on CPU for a tensor [N,3,H,W] or an iterable of batches."""
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    out = [extractor(b).cpu() for b in batches if len(b)]
    if not out:
        raise ValueError(f"{extractor.id}: no images to extract features from")
    return torch.cat(out)
