"""One run measured on a prompt set: samples, alignment, distribution metrics, loss curve."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from greedygrow.data.scenes import Scene, make_scene, parse_caption, render
from greedygrow.data.sources import IMAGE_EXTENSIONS
from greedygrow.evaluate.alignment import PromptResult, scene_prompts, score_image, summarize
from greedygrow.evaluate.distribution import Extractors, distribution_metrics
from greedygrow.sample import as_pil, load_for_sampling, sample_images, to_uint8
from greedygrow.sampling import DEFAULT_STEPS, native_bf16

References = tuple[str, Callable[[], Iterable[Tensor]]]  # (cache id, batches [B,3,R,R] in [−1,1])


@dataclass(frozen=True)
class Settings:
    """How samples are drawn; `seeds` gives the images per prompt (image seed = 10000·p + s);
    `bf16` None: bf16 autocast where the device computes bf16 natively (`native_bf16`)."""

    sampler: str = "dpmpp2m"
    steps: int = DEFAULT_STEPS["dpmpp2m"]
    guidance: float | None = None  # None: the run's exported default
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    resolution: int | None = None  # score at this size (samples resized); None: native
    batch_size: int = 64
    device: str = "cpu"
    ema: bool = True
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {list(self.seeds)}: give one or more distinct seeds")
        if min(self.seeds) < 0 or max(self.seeds) >= 10_000:
            raise ValueError(f"--seeds {list(self.seeds)}: seeds must lie in [0, 10000)")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"--batch-size {self.batch_size}, --steps {self.steps}: must be >= 1")
        if self.resolution is not None and not 16 <= self.resolution <= 4096:
            raise ValueError(f"--resolution {self.resolution}: choose 16 to 4096 px")


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
    """One prompt per line (# comments); scenes captions among them get their ground truth."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt per line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    captions = [ln for ln in lines if ln and not ln.startswith("#")]
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
    core_drift: float | None = None  # ‖θ − θ₁‖/‖θ₁‖ of a grown core (unfreeze, joint)


def read_loss_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """(step, loss) pairs from RUN/metrics.jsonl (empty if absent); malformed lines skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            row = json.loads(line)
            out.append((int(row["step"]), float(row["loss"])))
    return out


def read_core_drift(run_dir: str | os.PathLike, meta: dict[str, Any]) -> float | None:
    """The core's drift from phase 1, ‖θ − θ₁‖/‖θ₁‖: from the exported meta, else the last
    RUN/metrics.jsonl line that logs it; None where neither has it (phase 1, greedy, scratch)."""
    if meta.get("core_drift") is not None:
        return float(meta["core_drift"])
    path = Path(run_dir) / "metrics.jsonl"
    drift = None
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            drift = float(json.loads(line)["core_drift"])
    return drift


def sample_prompts(
    run_dir: str | os.PathLike,
    captions: Sequence[str],
    settings: Settings,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, list[int], list[int], dict[str, Any]]:
    """Sample every caption once per seed: (uint8 images, prompt index and seed per image, meta).

    The captions are encoded once; the images are drawn in batches of at most
    `settings.batch_size`, all of one size (±1), any prompts mixed in a batch."""
    model, encoder, schedule, meta = load_for_sampling(run_dir, settings.ema, settings.device)
    guidance = float(meta["guidance"] if settings.guidance is None else settings.guidance)
    bf16 = native_bf16(settings.device) if settings.bf16 is None else settings.bf16
    prompt_of = [p for p in range(len(captions)) for _ in settings.seeds]
    seeds = [10_000 * p + s for p in range(len(captions)) for s in settings.seeds]
    text = encoder.encode(list(captions)).to(settings.device)
    kw = dict(steps=settings.steps, sampler=settings.sampler, guidance=guidance, autocast=bf16)
    batches = torch.arange(len(seeds)).tensor_split(math.ceil(len(seeds) / settings.batch_size))
    images, done, start = [], 0, time.perf_counter()
    for rows in batches:
        rows = rows.tolist()
        x = sample_images(
            model, text[[prompt_of[i] for i in rows]], schedule, [seeds[i] for i in rows], **kw
        )
        images.append(to_uint8(x))
        done += len(rows)
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(f"{Path(run_dir).name}: {done}/{len(seeds)} images ({elapsed:.0f} s)")
    meta = {**meta, "guidance_used": guidance, "bf16_used": bf16}
    return torch.cat(images), prompt_of, seeds, meta


def folder_references(root: str | os.PathLike, resolution: int) -> References:
    """(cache id, batches in [−1,1]) of a folder of images; undecodable files are skipped."""
    from greedygrow.data.transforms import prepare_image

    root = Path(root)
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
            if len(batch) == 64:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)
        if bad:
            warnings.warn(f"--references {root}: skipped {bad} undecodable images", stacklevel=2)

    return ref_id, batches


def scene_references(prompts: PromptSet, resolution: int) -> References | None:
    """Ground-truth renders of the scene prompts as the reference set (None if none are)."""
    scenes = [s for s in prompts.scenes if s is not None]
    if len(scenes) < 2:
        return None

    def batches() -> Iterable[Tensor]:
        for i in range(0, len(scenes), 64):
            arr = np.stack([np.asarray(render(s, resolution)) for s in scenes[i : i + 64]])
            yield torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    truth = hashlib.sha256(json.dumps([s.to_dict() for s in scenes]).encode()).hexdigest()
    return f"{prompts.source}:truth:{truth[:16]}@{resolution}", batches


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
    x = images.float() / 127.5 - 1.0  # x = p / 127.5 − 1, the inverse of the sampler's p
    return distribution_metrics(x, captions, extractors, refs, cache_dir), notes


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
    """Sample a run and measure it; `references`: a folder, else the scene prompts' renders."""
    images, prompt_of, seeds, meta = sample_prompts(run_dir, prompts.captions, settings, progress)
    if settings.resolution is not None and settings.resolution != images.shape[-1]:
        size, bicubic = (settings.resolution,) * 2, Image.Resampling.BICUBIC
        resized = [np.array(as_pil(img).resize(size, bicubic)) for img in images]
        images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    captions = [prompts.captions[p] for p in prompt_of]
    start = time.perf_counter()
    pixels = images.permute(0, 2, 3, 1).numpy()  # uint8 [N, R, R, 3], as the scorer reads
    results = [
        None if (scene := prompts.scenes[p]) is None else score_image(img, scene, caption)
        for img, p, caption in zip(pixels, prompt_of, captions, strict=True)
    ]
    scored = [r for r in results if r is not None]
    aligned = time.perf_counter()
    dist, notes = _distribution(images, captions, prompts, extractors, references, cache_dir)
    if progress is not None:
        progress(
            f"{Path(run_dir).name}: alignment scored in {aligned - start:.1f} s, distribution "
            f"metrics in {time.perf_counter() - aligned:.1f} s"
        )
    return RunEvaluation(
        name=name or Path(run_dir).name,
        run_dir=str(run_dir),
        meta=meta,
        settings={
            "sampler": settings.sampler,
            "steps": settings.steps,
            "guidance": meta["guidance_used"],
            "bf16": meta["bf16_used"],
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
        alignment_summary=summarize(scored) if scored else None,
        distribution=dist,
        distribution_notes=notes,
        loss=read_loss_curve(run_dir),
        core_drift=read_core_drift(run_dir, meta),
    )
