"""Labelled sample grids: from a model in memory (the trainer's periodic grids) and from an
exported run folder (`greedygrow sample`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from greedygrow.checkpoint import load_model
from greedygrow.config import ConfigError
from greedygrow.diffusion import Schedule
from greedygrow.distributed import resolve_device
from greedygrow.sampling import DEFAULT_STEPS, native_bf16, sample, uvit_denoiser
from greedygrow.text import TextEmbeddings, TextEncoder, shared_text_encoder


def load_for_sampling(
    run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, TextEncoder, Schedule, dict]:
    """An exported run on `device`, ready to sample: (model, text encoder, schedule, meta)."""
    model, meta = load_model(run_dir, ema=ema, device=device)
    encoder = shared_text_encoder(meta["text_encoder"], meta["text_max_length"], str(device))
    return model, encoder, Schedule.from_dict(meta["schedule"]), meta


@torch.inference_mode()
def sample_images(
    model: nn.Module, text: TextEmbeddings, schedule: Schedule, seeds: list[int], **kw: Any
) -> Tensor:
    """Images [len(seeds),3,R,R] in [−1, 1] on the CPU, one per text row and seed, sampled on
    the text's device (`kw`: `sampling.sample`'s steps, sampler, guidance, ..., autocast)."""
    res, device = model.shell_config.resolution, text.device
    denoise = uvit_denoiser(model, text.tokens, text.mask, text.pooled)
    x = sample(denoise, (len(seeds), 3, res, res), schedule, seeds=seeds, device=device, **kw)
    return x.cpu()


def to_uint8(x: Tensor) -> Tensor:
    """Pixels p = round((x + 1) · 127.5) of images x in [−1, 1] (clamped), as uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def as_pil(image: Tensor) -> Image.Image:
    """A uint8 image [3, H, W] as PIL."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def sample_grid(
    model: nn.Module,
    encoder,
    schedule: Schedule,
    prompts: list[str],
    per_prompt: int,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    device: torch.device | str = "cpu",
    guidance_interval: tuple[float, float] | None = None,
    bf16: bool = False,
) -> Image.Image:
    """One row per prompt, `per_prompt` images (seeds seed..seed+per_prompt−1), labelled.

    All images are sampled as one batch; image j of every prompt uses seed + j, so a row
    differs from another only by its prompt. `guidance_interval` (λ_lo, λ_hi) limits guidance
    to those log-SNRs; `bf16` runs the model under bf16 autocast.
    """
    text = encoder.encode(list(prompts)).to(device).repeat_interleave(per_prompt)
    seeds = [seed + i % per_prompt for i in range(len(text))]
    x = sample_images(
        model,
        text,
        schedule,
        seeds,
        steps=steps,
        sampler=sampler,
        guidance=guidance,
        guidance_interval=guidance_interval,
        autocast=bf16,
    )
    return labelled_grid(list(x.split(per_prompt)), prompts)


def labelled_grid(rows: list[Tensor], labels: list[str], min_cell: int = 128) -> Image.Image:
    """A PNG-ready grid: each row of images [n,3,H,W] in [−1, 1] under its label (wrapped
    to the grid's width). Small images are enlarged (nearest) to at least `min_cell` px."""
    font = ImageFont.load_default()
    h, w = rows[0].shape[-2:]
    scale = max(1, math.ceil(min_cell / h))
    cell_h, cell_w, line_h, pad = h * scale, w * scale, 14, 4
    cols = max(r.shape[0] for r in rows)
    width = max(cols * (cell_w + pad) + pad, 256)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(label, width - 2 * pad, measure, font) for label in labels]
    height = pad + sum(len(lines) * line_h + cell_h + pad for lines in wrapped)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for images, lines in zip(rows, wrapped, strict=True):
        for line in lines:
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        for j, img in enumerate(images):
            tile = as_pil(to_uint8(img)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell_w + pad), y))
        y += cell_h + pad
    return canvas


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` px wide in `font`."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def sample_to_png(
    model_dir: str | Path,
    out: str | Path,
    prompts: list[str],
    steps: int | None = None,
    sampler: str = "dpmpp2m",
    guidance: float | None = None,
    seed: int = 0,
    per_prompt: int = 4,
    resolution: int | None = None,
    ema: bool = True,
    device: str = "auto",
    guidance_interval: tuple[float, float] | None = None,
    bf16: bool | None = None,
) -> Path:
    """Sample a labelled grid (one row per prompt) from an exported run; returns the PNG.
    None picks the defaults: `steps` DEFAULT_STEPS[sampler]; `bf16` bf16 autocast where the
    device computes bf16 natively (`native_bf16`)."""
    dev = resolve_device(device)
    model, encoder, schedule, meta = load_for_sampling(model_dir, ema, dev)
    if resolution is not None and resolution != model.shell_config.resolution:
        raise ConfigError(
            f"--resolution {resolution}: {model_dir} was trained at "
            f"{model.shell_config.resolution} px and its core sees a fixed "
            f"{model.core_config.grid}×{model.core_config.grid} grid; grow it to {resolution} "
            "px with `greedygrow grow` to sample there"
        )
    guidance = meta["guidance"] if guidance is None else guidance
    grid = sample_grid(
        model,
        encoder,
        schedule,
        prompts,
        per_prompt,
        DEFAULT_STEPS[sampler] if steps is None else steps,
        sampler,
        guidance,
        seed,
        dev,
        guidance_interval,
        native_bf16(dev) if bf16 is None else bf16,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
