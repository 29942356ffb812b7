"""`greedygrow evaluate`: sample a prompt set from one or more runs, score it, write a report.

For each run: sample every prompt once per seed with the chosen sampler, score alignment on
every prompt that is a scenes caption (built-in prompts always are), compute the
distribution metrics whose feature networks and reference images are available, and read the
training loss from RUN/metrics.jsonl. The output folder gets:

- ``metrics.json``: settings, alignment summary, distribution metrics and per-sample results
  for every run;
- ``report.html``: one self-contained page (plots and thumbnails embedded as base64 PNG);
- ``samples/<run>/p<prompt>-s<seed>.png``: every generated image.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from greedygrow.atomic import atomic_write_text
from greedygrow.checkpoint import load_model
from greedygrow.data.scenes import Scene, make_scene, parse_caption, render
from greedygrow.data.sources import IMAGE_EXTENSIONS
from greedygrow.diffusion import Schedule
from greedygrow.evaluate.alignment import (
    PromptResult,
    scene_prompts,
    score_image,
    summarize,
)
from greedygrow.evaluate.distribution import Extractors, distribution_metrics
from greedygrow.sampling import sample, uvit_denoiser
from greedygrow.text import shared_text_encoder

THUMB = 128  # thumbnail side in the HTML report
FD_MIN_IMAGES = 10_000  # below this, the report warns that FID / FD-DINOv2 are biased upwards


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


# --------------------------------------------------------------------------------------------
# Sampling and scoring one run
# --------------------------------------------------------------------------------------------


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
    distribution: dict[str, float] = field(default_factory=dict)
    distribution_notes: dict[str, str] = field(default_factory=dict)
    loss: list[tuple[int, float]] = field(default_factory=list)


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


def _resize(images: Tensor, resolution: int) -> Tensor:
    out = []
    for img in images:
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        pil = pil.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def sample_prompts(
    run_dir: str | os.PathLike,
    captions: Sequence[str],
    settings: Settings,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, list[int], list[int], dict[str, Any]]:
    """Sample every caption once per seed: (uint8 images [N,3,R,R], prompt index per image,
    image seeds, run meta). Image i depends only on its own seed (sampling contract)."""
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
        scene = prompts.scenes[p]
        if scene is None:
            results.append(None)
            continue
        results.append(score_image(img.permute(1, 2, 0).numpy(), scene, prompts.captions[p]))
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
    notes = (
        dict(extractors.notes or {})
        if extractors is not None
        else {"all": "distribution metrics not requested"}
    )
    dist: dict[str, float] = {}
    if extractors is not None and any(
        getattr(extractors, k) is not None for k in ("inception", "dinov2", "clip")
    ):
        res = images.shape[-1]
        refs = (
            folder_references(references, res)
            if references is not None
            else scene_references(prompts, res)
        )
        if refs is None:
            notes["references"] = "no reference images: FID, FD-DINOv2 and CMMD skipped"
        x = images.float() / 127.5 - 1.0
        dist = distribution_metrics(
            x,
            [prompts.captions[p] for p in prompt_of],
            extractors,
            references=refs[0] if refs else None,
            reference_id=refs[1] if refs else None,
            cache_dir=cache_dir or Path.home() / ".cache" / "greedygrow" / "reference-stats",
        )
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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(evals: Sequence[RunEvaluation]) -> dict[str, str]:
    """Base64 PNG plots: loss curves, accuracy per question kind, per count, confusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    if any(e.loss for e in evals):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for e in evals:
            if not e.loss:
                continue
            steps, loss = np.array(e.loss, dtype=np.float64).T
            ax.plot(steps, loss, alpha=0.3, lw=0.8)
            k = max(1, len(loss) // 50)  # moving average over ~2% of the run
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, label=e.name, color=ax.lines[-1].get_color())
        ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
        ax.legend()
        out["loss"] = _figure_b64(fig)
    scored = [e for e in evals if e.alignment_summary]
    if scored:
        kinds = ["dsg_score", "all_correct", "entity", "count", "attribute"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        width = 0.8 / len(scored)
        for i, e in enumerate(scored):
            s = e.alignment_summary
            vals = [
                s["dsg_score"],
                s["all_correct"],
                *[s["accuracy"].get(k, np.nan) for k in kinds[2:]],
            ]
            axes[0].bar(np.arange(len(kinds)) + i * width, vals, width, label=e.name)
            counts = sorted(int(n) for n in s["count_accuracy"])
            axes[1].bar(
                np.array(counts) + i * width,
                [s["count_accuracy"][str(n)] for n in counts],
                width,
                label=e.name,
            )
        axes[0].set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
        axes[0].set(ylim=(0, 1), ylabel="accuracy", title="Alignment per question kind")
        axes[1].set_xticks(np.arange(1, 6) + 0.4 - width / 2, [str(n) for n in range(1, 6)])
        axes[1].set(
            ylim=(0, 1),
            xlabel="objects asked for",
            ylabel="exact count accuracy",
            title="Counting accuracy per number",
        )
        axes[0].legend(fontsize=8)
        out["alignment"] = _figure_b64(fig)
        fig, axes = plt.subplots(1, len(scored), figsize=(4.2 * len(scored), 3.6), squeeze=False)
        for ax, e in zip(axes[0], scored, strict=True):
            cm = e.alignment_summary["count_confusion"]
            m = np.array(cm["matrix"])
            ax.imshow(m, cmap="Blues")
            for (r, c), v in np.ndenumerate(m):
                if v:
                    ax.text(
                        c,
                        r,
                        str(v),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if v > m.max() / 2 else "black",
                    )
            ax.set_xticks(range(m.shape[1]), cm["predicted"])
            ax.set_yticks(range(m.shape[0]), [str(t) for t in cm["true"]])
            ax.set(xlabel="counted in the image", ylabel="asked for", title=e.name)
        out["confusion"] = _figure_b64(fig)
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.prompt{margin:14px 0 4px;font-weight:600}.run{font-size:12px;color:#555;margin:2px 0}
.cell{display:inline-block;margin:2px;text-align:center;font-size:11px}
.cell img{display:block;border:3px solid #bbb;image-rendering:pixelated}
.ok img{border-color:#2a2}.bad img{border-color:#d33}.note{color:#666;font-size:13px}
"""

_METRIC_ROWS = [
    ("DSG score (mean prompt score)", lambda e: _al(e, "dsg_score")),
    ("all questions correct", lambda e: _al(e, "all_correct")),
    ("DSG score, held-out colour/shape pairs", lambda e: _al(e, "held_out_dsg_score")),
    ("entity accuracy", lambda e: _al(e, "accuracy", "entity")),
    ("count accuracy", lambda e: _al(e, "accuracy", "count")),
    ("attribute accuracy", lambda e: _al(e, "accuracy", "attribute")),
    ("FID ↓", lambda e: e.distribution.get("fid")),
    ("FD-DINOv2 ↓", lambda e: e.distribution.get("fd_dinov2")),
    ("CMMD ↓", lambda e: e.distribution.get("cmmd")),
    ("CLIPScore ↑", lambda e: e.distribution.get("clip_score")),
]


def _al(e: RunEvaluation, *keys: str) -> float | None:
    v: Any = e.alignment_summary
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _thumb(img: Tensor) -> Image.Image:
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    if pil.width < THUMB:
        return pil.resize((THUMB, THUMB), Image.Resampling.NEAREST)
    if pil.width > THUMB:
        return pil.resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    return pil


def render_html(evals: Sequence[RunEvaluation], prompts: PromptSet, max_prompts: int = 60) -> str:
    """The self-contained HTML report."""
    e0 = evals[0]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>greedygrow evaluation: {esc(', '.join(e.name for e in evals))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>greedygrow evaluation</h1><p class='note'>{len(prompts.captions)} prompts "
        f"({esc(prompts.source)}), {len(e0.settings['seeds'])} seeds each, sampler "
        f"{esc(e0.settings['sampler'])}, {e0.settings['steps']} steps.</p>",
    ]
    head = "".join(f"<th>{esc(e.name)}</th>" for e in evals)
    parts.append(f"<h2>Runs</h2><table><tr><th class='l'>setting</th>{head}</tr>")
    rows = [
        ("run folder", lambda e: e.run_dir),
        ("training step", lambda e: e.meta.get("step")),
        ("phase / mode", lambda e: f"{e.meta.get('phase', '—')} / {e.meta.get('mode', '—')}"),
        ("resolution", lambda e: e.settings["resolution"]),
        ("guidance", lambda e: e.settings["guidance"]),
        ("images", lambda e: e.settings["images"]),
        ("last training loss", lambda e: _fmt(e.loss[-1][1]) if e.loss else "—"),
    ]
    for label, get in rows:
        cells = "".join(f"<td>{esc(str(get(e)))}</td>" for e in evals)
        parts.append(f"<tr><td class='l'>{label}</td>{cells}</tr>")
    parts.append("</table><h2>Metrics</h2>")
    parts.append(f"<table><tr><th class='l'>metric</th>{head}</tr>")
    for label, get in _METRIC_ROWS:
        parts.append(
            f"<tr><td class='l'>{esc(label)}</td>"
            + "".join(f"<td>{_fmt(get(e))}</td>" for e in evals)
            + "</tr>"
        )
    parts.append("</table>")
    notes = {f"{e.name}: {k}": v for e in evals for k, v in e.distribution_notes.items()}
    if notes:
        parts.append(
            "<p class='note'>Not computed:</p><ul class='note'>"
            + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in notes.items())
            + "</ul>"
        )
    few = sorted(
        {e.settings["images"] for e in evals if {"fid", "fd_dinov2"} & set(e.distribution)}
    )
    if few and few[0] < FD_MIN_IMAGES:
        parts.append(
            f"<p class='note'>FID and FD-DINOv2 here come from {', '.join(map(str, few))} images "
            "per run: Fréchet distances are biased upwards at small N, so compare runs only at "
            f"equal N and quote numbers from ≥ {FD_MIN_IMAGES:,} images.</p>"
        )
    plots = _plots(evals)
    for key, title in [
        ("alignment", "Alignment"),
        ("confusion", "Count confusion matrix"),
        ("loss", "Training loss"),
    ]:
        if key in plots:
            parts.append(
                f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{plots[key]}'>"
            )
    if "loss" not in plots:
        parts.append("<p class='note'>No training loss: the runs have no metrics.jsonl.</p>")
    parts.append(
        "<h2>Samples</h2><p class='note'>Green border: every question right; red: "
        "at least one wrong (hover for the wrong answers); grey: not scored.</p>"
    )
    for p, caption in enumerate(prompts.captions[:max_prompts]):
        parts.append(f"<div class='prompt'>{p}. {esc(caption)}</div>")
        for e in evals:
            parts.append(f"<div class='run'>{esc(e.name)}</div><div>")
            for i in (i for i, q in enumerate(e.prompt_of) if q == p):
                r = e.alignment[i]
                cls, label, tip = "cell", f"seed {e.seeds[i]}", ""
                if r is not None:
                    cls += " ok" if r.all_correct else " bad"
                    label += f" · {r.score:.2f}"
                    tip = "; ".join(
                        f"{q.text} → {a}"
                        for q, a, c in zip(r.questions, r.answers, r.correct, strict=True)
                        if not c
                    )
                parts.append(
                    f"<div class='{cls}' title='{esc(tip)}'><img alt='sample' "
                    f"src='data:image/png;base64,{_png_b64(_thumb(e.images[i]))}'>"
                    f"{esc(label)}</div>"
                )
            parts.append("</div>")
    if len(prompts.captions) > max_prompts:
        parts.append(
            f"<p class='note'>{len(prompts.captions) - max_prompts} more prompts in "
            "samples/ and metrics.json.</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def metrics_dict(evals: Sequence[RunEvaluation], prompts: PromptSet) -> dict[str, Any]:
    """The JSON written to metrics.json."""
    runs = []
    for e in evals:
        samples = []
        for i, p in enumerate(e.prompt_of):
            r = e.alignment[i]
            samples.append(
                {
                    "prompt": p,
                    "seed": e.seeds[i],
                    "file": f"samples/{e.name}/p{p:04d}-s{e.seeds[i]}.png",
                    **(
                        {
                            "score": r.score,
                            "all_correct": r.all_correct,
                            "answers": {
                                q.text: a for q, a in zip(r.questions, r.answers, strict=True)
                            },
                        }
                        if r is not None
                        else {}
                    ),
                }
            )
        runs.append(
            {
                "name": e.name,
                "run": e.run_dir,
                "step": e.meta.get("step"),
                "settings": e.settings,
                "alignment": e.alignment_summary,
                "distribution": e.distribution,
                "distribution_missing": e.distribution_notes,
                "final_loss": e.loss[-1][1] if e.loss else None,
                "samples": samples,
            }
        )
    return {"prompts": prompts.captions, "prompt_source": prompts.source, "runs": runs}


def write_report(
    evals: Sequence[RunEvaluation], prompts: PromptSet, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write metrics.json, report.html and samples/<run>/*.png into `out_dir`."""
    if not evals:
        raise ValueError("write_report: no runs")
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise ValueError(f"write_report: run names must be distinct, got {names}")
    out = Path(out_dir)
    for e in evals:
        folder = out / "samples" / e.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(e.prompt_of):
            Image.fromarray(e.images[i].permute(1, 2, 0).numpy()).save(
                folder / f"p{p:04d}-s{e.seeds[i]}.png"
            )
    metrics = out / "metrics.json"
    atomic_write_text(
        metrics, json.dumps(metrics_dict(evals, prompts), indent=1, default=_json_default) + "\n"
    )
    report = out / "report.html"
    atomic_write_text(report, render_html(evals, prompts))
    return {"metrics": metrics, "report": report, "samples": out / "samples"}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def unique_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Report names for runs: folder names, made distinct with their parents if needed."""
    paths = [Path(r).resolve() for r in run_dirs]
    base = [p.name for p in paths]
    names = [f"{p.parent.name}-{p.name}" if base.count(p.name) > 1 else p.name for p in paths]
    dup = [n for n in names if names.count(n) > 1]  # the same folder twice: number them
    return [f"{n}-{i}" if n in dup else n for i, n in enumerate(names)]


def evaluate(
    model: str | os.PathLike,
    out: str | os.PathLike,
    compare: Sequence[str | os.PathLike] = (),
    prompts_file: str | None = None,
    count: int = 50,
    references: str | None = None,
    settings: Settings = Settings(),
    extractors: Extractors | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """The `greedygrow evaluate` command: evaluate `model` (and `compare` runs), write the
    report into `out`. Returns the paths written."""
    if references is not None and not Path(references).is_dir():  # fail before sampling
        raise FileNotFoundError(f"--references {references}: not a folder of images")
    prompts = read_prompts(prompts_file) if prompts_file else builtin_prompts(count)
    runs = [model, *compare]
    evals = [
        evaluate_run(
            r, prompts, settings, extractors, references, cache_dir, name=n, progress=progress
        )
        for r, n in zip(runs, unique_names(runs), strict=True)
    ]
    return write_report(evals, prompts, out)
