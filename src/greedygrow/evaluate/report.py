"""`greedygrow evaluate`: measure runs, write metrics.json, report.html and samples/."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import Tensor

from greedygrow.atomic import atomic_write_text
from greedygrow.evaluate.distribution import Extractors
from greedygrow.evaluate.runs import (
    PromptSet,
    RunEvaluation,
    Settings,
    builtin_prompts,
    evaluate_run,
    read_prompts,
)
from greedygrow.sample import as_pil

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMB = 128  # thumbnail side in the HTML report
FD_MIN_IMAGES = 10_000  # below this, the report warns that FID / FD-DINOv2 are biased upwards


def _png_src(image: Image.Image | Figure) -> str:
    """A PIL image or a matplotlib figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    if isinstance(image, Image.Image):
        image.save(buf, format="PNG")
    else:
        image.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure  # late: matplotlib is slow to import

    return Figure(**kwargs)


def _loss_plot(evals: Sequence[RunEvaluation]) -> str:
    """Training loss per run, raw and smoothed, on a log scale."""
    ax = _figure(figsize=(7, 3.5)).subplots()
    for e in evals:
        steps, loss = np.array(e.loss, dtype=np.float64).T
        ax.plot(steps, loss, alpha=0.3, lw=0.8)
        k = max(1, len(loss) // 50)  # moving average over ~2% of the run
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=e.name, color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    ax.legend()
    return _png_src(ax.figure)


def _alignment_plot(scored: Sequence[RunEvaluation]) -> str:
    """Bars per run: scores and accuracy per question kind; exact count accuracy per number."""
    kinds = ["dsg_score", "all_correct", "entity", "count", "attribute"]
    axes = _figure(figsize=(11, 3.5)).subplots(1, 2)
    width = 0.8 / len(scored)
    for i, e in enumerate(scored):
        s = e.alignment_summary
        per_kind = [s["accuracy"].get(k, np.nan) for k in kinds[2:]]
        vals = [s["dsg_score"], s["all_correct"], *per_kind]
        axes[0].bar(np.arange(len(kinds)) + i * width, vals, width, label=e.name)
        counts = sorted(int(n) for n in s["count_accuracy"])
        accuracy = [s["count_accuracy"][str(n)] for n in counts]
        axes[1].bar(np.array(counts) + i * width, accuracy, width, label=e.name)
    axes[0].set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    axes[0].set(ylim=(0, 1), ylabel="accuracy", title="Alignment per question kind")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(np.arange(1, 6) + 0.4 - width / 2, [str(n) for n in range(1, 6)])
    axes[1].set(ylim=(0, 1), xlabel="objects asked for", ylabel="exact count accuracy")
    axes[1].set_title("Counting accuracy per number")
    return _png_src(axes[0].figure)


def train_cost(meta: dict[str, Any]) -> dict[str, float] | None:
    """What training the model cost, summed over its phases (the export's compute.total, else
    its phase's where the phases before are unknown), or None for exports without it."""
    compute = meta.get("compute") or {}
    return compute.get("total") or compute.get("phase")


def _flops_plot(costed: Sequence[RunEvaluation]) -> str:
    """DSG score and all-correct against training FLOPs, one point per run."""
    ax = _figure(figsize=(7, 3.5)).subplots()
    for key, marker in (("dsg_score", "o"), ("all_correct", "s")):
        x = [train_cost(e.meta)["train_flops"] for e in costed]
        ax.scatter(x, [e.alignment_summary[key] for e in costed], marker=marker, label=key)
    for e in costed:
        flops = train_cost(e.meta)["train_flops"]
        ax.annotate(e.name, (flops, e.alignment_summary["dsg_score"]), fontsize=8)
    ax.set(xscale="log", ylim=(0, 1), xlabel="training FLOPs (all phases)", ylabel="score")
    ax.set_title("Alignment against training compute")
    ax.legend(fontsize=8)
    return _png_src(ax.figure)


def _confusion_plot(scored: Sequence[RunEvaluation]) -> str:
    """The count confusion matrix of each run, side by side."""
    fig = _figure(figsize=(4.2 * len(scored), 3.6))
    for ax, e in zip(fig.subplots(1, len(scored), squeeze=False)[0], scored, strict=True):
        cm = e.alignment_summary["count_confusion"]
        m = np.array(cm["matrix"])
        ax.imshow(m, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            if v:
                color = "white" if v > m.max() / 2 else "black"
                ax.text(c, r, str(v), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(m.shape[1]), cm["predicted"])
        ax.set_yticks(range(m.shape[0]), [str(t) for t in cm["true"]])
        ax.set(xlabel="counted in the image", ylabel="asked for", title=e.name)
    return _png_src(fig)


def _plots(evals: Sequence[RunEvaluation]) -> list[str]:
    """The report's plot sections: alignment and confusion of scored runs, loss of logged ones."""
    scored, logged = [e for e in evals if e.alignment_summary], [e for e in evals if e.loss]
    costed = [e for e in scored if train_cost(e.meta)]
    out = []
    for title, plot, runs in (
        ("Alignment", _alignment_plot, scored),
        ("Alignment against training compute", _flops_plot, costed),
        ("Count confusion matrix", _confusion_plot, scored),
        ("Training loss", _loss_plot, logged),
    ):
        if runs:
            out.append(f"<h2>{title}</h2><img alt='{title}' src='{plot(runs)}'>")
    if not logged:
        out.append("<p class='note'>No training loss: the runs have no metrics.jsonl.</p>")
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

_RUN_ROWS = [
    ("run folder", lambda e: e.run_dir),
    ("training step", lambda e: e.meta.get("step")),
    ("phase / mode", lambda e: f"{e.meta.get('phase', '—')} / {e.meta.get('mode', '—')}"),
    ("resolution", lambda e: e.settings["resolution"]),
    ("guidance", lambda e: e.settings["guidance"]),
    ("images", lambda e: e.settings["images"]),
    ("last training loss", lambda e: _fmt(e.loss[-1][1]) if e.loss else "—"),
    ("training FLOPs, all phases", lambda e: _cost(e, "train_flops", "{:.3g}")),
    ("training images, all phases", lambda e: _cost(e, "images", "{:,.0f}")),
    ("training wall hours, all phases", lambda e: _cost(e, "wall_s", "{:.2f}", 1 / 3600)),
]


def _cost(e: RunEvaluation, key: str, form: str, scale: float = 1.0) -> str:
    cost = train_cost(e.meta)
    return form.format(cost[key] * scale) if cost else "—"


_METRIC_ROWS = [
    ("DSG score (mean prompt score)", lambda e: _al(e, "dsg_score")),
    ("all questions correct", lambda e: _al(e, "all_correct")),
    ("DSG score, held-out colour/shape pairs", lambda e: _al(e, "held_out_dsg_score")),
    ("DSG score, the other prompts", lambda e: _al(e, "seen_dsg_score")),
    ("entity accuracy", lambda e: _al(e, "accuracy", "entity")),
    ("count accuracy", lambda e: _al(e, "accuracy", "count")),
    ("attribute accuracy", lambda e: _al(e, "accuracy", "attribute")),
    ("core drift from phase 1 ‖θ − θ₁‖/‖θ₁‖", lambda e: e.core_drift),
    ("FID ↓", lambda e: e.distribution.get("fid")),
    ("FD-DINOv2 ↓", lambda e: e.distribution.get("fd_dinov2")),
    ("CMMD ↓", lambda e: e.distribution.get("cmmd")),
    ("CLIPScore ↑", lambda e: e.distribution.get("clip_score")),
]


def _al(e: RunEvaluation, *keys: str) -> float | None:
    v: Any = e.alignment_summary
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _thumb(img: Tensor) -> Image.Image:
    pil = as_pil(img)
    up = pil.width < THUMB  # small samples are enlarged pixel for pixel
    return pil.resize((THUMB, THUMB), Image.Resampling.NEAREST if up else Image.Resampling.LANCZOS)


def _table(evals: Sequence[RunEvaluation], first: str, rows: list, cell: Callable) -> str:
    """One column per run; `rows` are (label, value of a run), each shown as `cell(value)`."""
    esc = html.escape
    head = "".join(f"<th>{esc(e.name)}</th>" for e in evals)
    body = "".join(
        f"<tr><td class='l'>{esc(label)}</td>"
        + "".join(f"<td>{esc(cell(get(e)))}</td>" for e in evals)
        + "</tr>\n"
        for label, get in rows
    )
    return f"<table><tr><th class='l'>{first}</th>{head}</tr>\n{body}</table>"


def _caveats(evals: Sequence[RunEvaluation]) -> list[str]:
    """Notes on the metrics table: what was not computed, and FD at small sample sizes."""
    esc, out = html.escape, []
    notes = {f"{e.name}: {k}": v for e in evals for k, v in e.distribution_notes.items()}
    if notes:
        items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in notes.items())
        out.append(f"<p class='note'>Not computed:</p><ul class='note'>{items}</ul>")
    with_fd = [e for e in evals if {"fid", "fd_dinov2"} & set(e.distribution)]
    few = sorted({e.settings["images"] for e in with_fd})
    if few and few[0] < FD_MIN_IMAGES:
        out.append(
            f"<p class='note'>FID and FD-DINOv2 here come from {', '.join(map(str, few))} images "
            "per run: Fréchet distances are biased upwards at small N, so compare runs only at "
            f"equal N and quote numbers from ≥ {FD_MIN_IMAGES:,} images.</p>"
        )
    return out


def _sample_cell(e: RunEvaluation, i: int) -> str:
    """Sample i's thumbnail, bordered green (every question right), red (not) or grey."""
    r = e.alignment[i]
    cls, label, tip = "cell", f"seed {e.seeds[i]}", ""
    if r is not None:
        cls += " ok" if r.all_correct else " bad"
        label += f" · {r.score:.2f}"
        wrong = zip(r.questions, r.answers, r.correct, strict=True)
        tip = "; ".join(f"{q.text} → {a}" for q, a, c in wrong if not c)
    src, esc = _png_src(_thumb(e.images[i])), html.escape
    return f"<div class='{cls}' title='{esc(tip)}'><img alt='sample' src='{src}'>{esc(label)}</div>"


def _samples(evals: Sequence[RunEvaluation], prompts: PromptSet, max_prompts: int) -> list[str]:
    """The samples section: the first `max_prompts` prompts, every run's images of each."""
    out = [
        "<h2>Samples</h2><p class='note'>Green border: every question right; red: "
        "at least one wrong (hover for the wrong answers); grey: not scored.</p>"
    ]
    for p, caption in enumerate(prompts.captions[:max_prompts]):
        out.append(f"<div class='prompt'>{p}. {html.escape(caption)}</div>")
        for e in evals:
            cells = "".join(_sample_cell(e, i) for i, q in enumerate(e.prompt_of) if q == p)
            out.append(f"<div class='run'>{html.escape(e.name)}</div><div>{cells}</div>")
    if len(prompts.captions) > max_prompts:
        out.append(
            f"<p class='note'>{len(prompts.captions) - max_prompts} more prompts in "
            "samples/ and metrics.json.</p>"
        )
    return out


def render_html(evals: Sequence[RunEvaluation], prompts: PromptSet, max_prompts: int = 60) -> str:
    """The self-contained HTML report."""
    e0, esc = evals[0], html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>greedygrow evaluation: {esc(', '.join(e.name for e in evals))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>greedygrow evaluation</h1><p class='note'>{len(prompts.captions)} prompts "
        f"({esc(prompts.source)}), {len(e0.settings['seeds'])} seeds each, sampler "
        f"{esc(e0.settings['sampler'])}, {e0.settings['steps']} steps.</p>",
        "<h2>Runs</h2>" + _table(evals, "setting", _RUN_ROWS, str),
        "<h2>Metrics</h2>" + _table(evals, "metric", _METRIC_ROWS, _fmt),
        *_caveats(evals),
        *_plots(evals),
        *_samples(evals, prompts, max_prompts),
        "</body></html>",
    ]
    return "\n".join(parts)


def _sample_file(e: RunEvaluation, i: int) -> str:
    """Sample i's PNG, relative to the report folder."""
    return f"samples/{e.name}/p{e.prompt_of[i]:04d}-s{e.seeds[i]}.png"


def _sample_record(e: RunEvaluation, i: int) -> dict[str, Any]:
    """Sample i in metrics.json: prompt, seed, file and (if scored) its alignment answers."""
    out: dict[str, Any] = {"prompt": e.prompt_of[i], "seed": e.seeds[i], "file": _sample_file(e, i)}
    if (r := e.alignment[i]) is not None:
        answers = {q.text: a for q, a in zip(r.questions, r.answers, strict=True)}
        out.update(score=r.score, all_correct=r.all_correct, answers=answers)
    return out


def metrics_dict(evals: Sequence[RunEvaluation], prompts: PromptSet) -> dict[str, Any]:
    """The JSON written to metrics.json."""
    runs = [
        {
            "name": e.name,
            "run": e.run_dir,
            "step": e.meta.get("step"),
            "settings": e.settings,
            "alignment": e.alignment_summary,
            "core_drift": e.core_drift,
            "distribution": e.distribution,
            "distribution_missing": e.distribution_notes,
            "final_loss": e.loss[-1][1] if e.loss else None,
            "train_cost": train_cost(e.meta),
            "samples": [_sample_record(e, i) for i in range(len(e.prompt_of))],
        }
        for e in evals
    ]
    return {"prompts": prompts.captions, "prompt_source": prompts.source, "runs": runs}


def write_report(
    evals: Sequence[RunEvaluation], prompts: PromptSet, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write metrics.json, report.html and samples/<run>/*.png into `out_dir`."""
    out = Path(out_dir)
    for e in evals:
        (out / "samples" / e.name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(e.images):
            as_pil(image).save(out / _sample_file(e, i))
    text = json.dumps(metrics_dict(evals, prompts), indent=1) + "\n"
    metrics = atomic_write_text(out / "metrics.json", text)
    report = atomic_write_text(out / "report.html", render_html(evals, prompts))
    return {"metrics": metrics, "report": report, "samples": out / "samples"}


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
    settings: Settings = Settings(),  # noqa: B008 (frozen, so immutable)
    extractors: Extractors | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """`greedygrow evaluate`: measure `model` and the `compare` runs, write the report to `out`."""
    if references is not None and not Path(references).is_dir():  # fail before sampling
        raise FileNotFoundError(f"--references {references}: not a folder of images")
    prompts = read_prompts(prompts_file) if prompts_file else builtin_prompts(count)
    runs = [model, *compare]
    evals = [
        evaluate_run(r, prompts, settings, extractors, references, cache_dir, n, progress)
        for r, n in zip(runs, unique_names(runs), strict=True)
    ]
    return write_report(evals, prompts, out)
