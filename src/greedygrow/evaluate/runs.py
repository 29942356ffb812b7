"""One run measured on a prompt set: sample every prompt once per seed with the chosen sampler,
score alignment on every prompt that is a scenes caption (built-in prompts always are),
compute the distribution metrics whose feature networks and reference images are available,
and read the training loss from RUN/metrics.jsonl (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from greedygrow.checkpoint import load_model
from greedygrow.data.scenes import Scene, make_scene, parse_caption, render
from greedygrow.data.sources import IMAGE_EXTENSIONS
from greedygrow.diffusion import Schedule
from greedygrow.evaluate.alignment import PromptResult, scene_prompts, score_image, summarize
from greedygrow.evaluate.distribution import Extractors, distribution_metrics
from greedygrow.sampling import sample, uvit_denoiser
from greedygrow.text import shared_text_encoder

STATS_CACHE = Path.home() / ".cache" / "greedygrow" / "reference-stats"


@dataclass(frozen=True)
class Settings:
    """How samples are drawn; `seeds` gives the images per prompt (image seed = 10000·p + s)."""

    sampler: str = "dpmpp2m"
    steps: int = 50
    guidance: float | None = None  # None: the run's exported default
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    resolution: int | None = None  # score at this size (samples resized); None: native
    batch_size: int = 16
    device: str = "cpu"
    ema: bool = True

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {list(self.seeds)}: give one or more distinct seeds")
        if min(self.seeds) < 0 or max(self.seeds) >= 10_000:
            raise ValueError(f"--seeds {list(self.seeds)}: seeds must lie in [0, 10000)")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(
                f"--batch-size {self.batch_size} and --steps {self.steps} must be >= 1"
            )
        if self.resolution is not None and not 16 <= self.resolution <= 4096:
            raise ValueError(f"--resolution {self.resolution}: choose 16 to 4096 px")

    def image_seed(self, prompt: int, seed: int) -> int:
        return 10_000 * prompt + seed


@dataclass
class PromptSet:
    """Prompts, with the scene ground truth of those that are scenes captions (else None)."""

    captions: list[str]
    scenes: list[Scene | None]
    source: str

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError(f"{self.source}: no prompts")


def builtin_prompts(count: int) -> PromptSet:
    """`count` built-in scenes prompts (alignment.scene_prompts)."""
    scenes = scene_prompts(count)
    return PromptSet([s.caption for s in scenes], list(scenes), f"scenes-eval:{count}")


def read_prompts(path: str | os.PathLike) -> PromptSet:
    """One prompt per line (blank lines and lines starting with # skipped); prompts that parse
    as scenes captions ("two red circles and a striped blue star") are scored for alignment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt per line)")
    captions = [
        ln.strip()
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    scenes: list[Scene | None] = []
    for caption in captions:
        groups = parse_caption(caption)
        try:
            scenes.append(make_scene(groups) if groups else None)
        except ValueError:  # e.g. more than five objects: no scene ground truth
            scenes.append(None)
    return PromptSet(captions, scenes, f"file:{path.resolve()}")


@dataclass
class RunEvaluation:
    """Everything measured for one run."""

    name: str
    run_dir: str
    meta: dict[str, Any]
    settings: dict[str, Any]
    images: Tensor  # uint8 [N, 3, R, R]
    prompt_of: list[int]
    seeds: list[int]
    alignment: list[PromptResult | None]
    alignment_summary: dict[str, Any] | None
    distribution: dict[str, float]
    distribution_notes: dict[str, str]  # metric or feature network -> why it is missing
    loss: list[tuple[int, float]]  # (step, training loss)


def read_loss_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, loss) pairs from RUN/metrics.jsonl (empty if absent); malformed lines skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            out.append((int(row["step"]), float(row["loss"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _to_uint8(x: Tensor) -> Tensor:
    # p = round((x + 1) · 127.5), x ∈ [−1, 1] → p ∈ [0, 255]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def as_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())  # uint8 [3, H, W] → PIL


def _resize(images: Tensor, resolution: int) -> Tensor:
    size, bicubic = (resolution, resolution), Image.Resampling.BICUBIC
    out = [torch.from_numpy(np.array(as_pil(img).resize(size, bicubic))) for img in images]
    return torch.stack(out).permute(0, 3, 1, 2)


@torch.no_grad()
def sample_prompts(
    run_dir: str | os.PathLike,
    captions: Sequence[str],
    settings: Settings,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, list[int], list[int], dict[str, Any]]:
    """Sample every caption once per seed: (uint8 images [N,3,R,R], prompt index per image,
    image seeds, run meta). Image i depends only on its own seed (docs/method.md, "Sampling")."""
    model, meta = load_model(run_dir, ema=settings.ema, device=settings.device)
    encoder = shared_text_encoder(
        meta["text_encoder"], int(meta.get("text_max_length", 32)), settings.device
    )
    schedule = Schedule.from_dict(meta["schedule"])
    guidance = float(meta.get("guidance", 1.0) if settings.guidance is None else settings.guidance)
    res = model.shell_config.resolution
    jobs = [(p, settings.image_seed(p, s)) for p in range(len(captions)) for s in settings.seeds]
    images = []
    for start in range(0, len(jobs), settings.batch_size):
        batch = jobs[start : start + settings.batch_size]
        text = encoder.encode([captions[p] for p, _ in batch]).to(settings.device)
        denoise = uvit_denoiser(model, text.tokens, text.mask, text.pooled)
        x = sample(
            denoise,
            (len(batch), 3, res, res),
            schedule,
            steps=settings.steps,
            sampler=settings.sampler,
            guidance=guidance,
            seeds=[s for _, s in batch],
            device=settings.device,
        )
        images.append(_to_uint8(x.cpu()))
        if progress is not None:
            progress(f"{Path(run_dir).name}: {start + len(batch)}/{len(jobs)} images")
    meta = {**meta, "guidance_used": guidance}
    return torch.cat(images), [p for p, _ in jobs], [s for _, s in jobs], meta


def score_alignment(
    images: Tensor, prompt_of: Sequence[int], prompts: PromptSet
) -> tuple[list[PromptResult | None], dict[str, Any] | None]:
    """Alignment results per image (None where the prompt has no scene ground truth)."""
    results: list[PromptResult | None] = []
    for img, p in zip(images, prompt_of, strict=True):
        scene, caption = prompts.scenes[p], prompts.captions[p]
        results.append(None if scene is None else score_image(as_pil(img), scene, caption))
    scored = [r for r in results if r is not None]
    return results, (summarize(scored) if scored else None)


def folder_references(
    root: str | os.PathLike, resolution: int, batch_size: int = 64
) -> tuple[Callable[[], Iterable[Tensor]], str]:
    """(batches of reference images [B,3,R,R] in [−1,1], cache id) for a folder of images;
    undecodable files are skipped with a warning. The id changes with the folder's files."""
    from greedygrow.data.transforms import prepare_image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--references {root}: not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower()[1:] in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"--references {root}: found {len(files)} images; need at least 2")
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    ref_id = f"folder:{root.resolve()}:{len(files)}:{h.hexdigest()[:16]}@{resolution}"

    def batches() -> Iterable[Tensor]:
        batch, bad = [], 0
        for path in files:
            try:
                with Image.open(path) as img:
                    batch.append(prepare_image(img, resolution, train=False))
            except Exception:  # any undecodable file is bad input: skipped and counted
                bad += 1
                continue
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
        if bad:
            warnings.warn(f"--references {root}: skipped {bad} undecodable images", stacklevel=2)

    return batches, ref_id


def scene_references(
    prompts: PromptSet, resolution: int
) -> tuple[Callable[[], Iterable[Tensor]], str] | None:
    """Ground-truth renders of the scene prompts as the reference set (None if none are)."""
    scenes = [s for s in prompts.scenes if s is not None]
    if len(scenes) < 2:
        return None

    def batches() -> Iterable[Tensor]:
        for i in range(0, len(scenes), 64):
            arr = np.stack([np.asarray(render(s, resolution)) for s in scenes[i : i + 64]])
            yield torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    truth = hashlib.sha256(json.dumps([s.to_dict() for s in scenes]).encode()).hexdigest()
    return batches, f"{prompts.source}:truth:{truth[:16]}@{resolution}"


def _distribution(
    images: Tensor,
    captions: list[str],
    prompts: PromptSet,
    extractors: Extractors | None,
    references: str | None,
    cache_dir: str | os.PathLike | None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Distribution metrics of uint8 `images` (one caption each) and what was not computed."""
    if extractors is None:
        return {}, {"all": "distribution metrics not requested"}
    notes = dict(extractors.notes)
    if all(getattr(extractors, k) is None for k in ("inception", "dinov2", "clip")):
        return {}, notes
    res = images.shape[-1]
    refs = folder_references(references, res) if references else scene_references(prompts, res)
    if refs is None:
        notes["references"] = "no reference images: FID, FD-DINOv2 and CMMD skipped"
    ref_images, ref_id = refs or (None, None)
    x = images.float() / 127.5 - 1.0  # x = p / 127.5 − 1, the inverse of _to_uint8
    cache = cache_dir or STATS_CACHE
    return distribution_metrics(x, captions, extractors, ref_images, ref_id, cache), notes


def evaluate_run(
    run_dir: str | os.PathLike,
    prompts: PromptSet,
    settings: Settings,
    extractors: Extractors | None = None,
    references: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunEvaluation:
    """Sample, score alignment and distribution metrics, and read the loss curve of a run.

    references: a folder of images, or None to use the scene prompts' ground-truth renders.
    """
    images, prompt_of, seeds, meta = sample_prompts(run_dir, prompts.captions, settings, progress)
    if settings.resolution is not None and settings.resolution != images.shape[-1]:
        images = _resize(images, settings.resolution)
    results, summary = score_alignment(images, prompt_of, prompts)
    captions = [prompts.captions[p] for p in prompt_of]
    dist, notes = _distribution(images, captions, prompts, extractors, references, cache_dir)
    return RunEvaluation(
        name=name or Path(run_dir).name,
        run_dir=str(run_dir),
        meta=meta,
        settings={
            "sampler": settings.sampler,
            "steps": settings.steps,
            "guidance": meta["guidance_used"],
            "seeds": list(settings.seeds),
            "resolution": int(images.shape[-1]),
            "ema": settings.ema,
            "prompts": prompts.source,
            "images": int(images.shape[0]),
        },
        images=images,
        prompt_of=prompt_of,
        seeds=seeds,
        alignment=results,
        alignment_summary=summary,
        distribution=dist,
        distribution_notes=notes,
        loss=read_loss_curve(run_dir),
    )
