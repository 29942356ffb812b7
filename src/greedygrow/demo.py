"""`greedygrow demo`: the whole method on the built-in scenes, CPU-sized — train a core at
32 px, grow it (greedy) to 64 px, sample the same prompts from the core and the grown model, and
from the shipped scenes-128 model (what the full recipe reaches, docs/models.md).
Its two runs are the presets demo-core and demo-grow (demo-quick-* for `--quick`)."""

from __future__ import annotations

import time
from pathlib import Path

from greedygrow.config import grow_config, train_core_config
from greedygrow.sample import sample_to_png
from greedygrow.shipped import resolve_model
from greedygrow.train import train

GROWN_RESOLUTION = 64
SHIPPED = "scenes-128"  # the shipped model whose grid ends the demo
# the last two ask for colour/shape pairs that the scenes never draw (scenes.HELD_OUT)
PROMPTS = (
    "a red circle",
    "two blue squares",
    "a yellow star and a black square",
    "three green circles",
    "an orange circle",
    "a purple star",
)


def demo(out: str | Path, quick: bool = False) -> dict[str, Path]:
    """Run the demo into `out` (again: resume it); returns what it wrote."""
    out = Path(out)
    cache = [f"data.text_cache_dir={out / 'text-cache'}"]
    preset = "demo-quick" if quick else "demo"
    t0 = time.time()
    print(f"[demo] phase 1: training a Shallow-UViT core at 32 px -> {out / 'core'}")
    train(train_core_config(f"{preset}-core", cache), out / "core")
    print(
        f"[demo] phase 1 took {time.time() - t0:.0f} s; phase 2: growing the core to "
        f"{GROWN_RESOLUTION} px, frozen (greedy) -> {out / 'grown'}"
    )
    t1 = time.time()
    grown = grow_config(
        str(out / "core"), GROWN_RESOLUTION, "greedy", None, f"{preset}-grow", cache
    )
    train(grown, out / "grown")
    print(
        f"[demo] phase 2 took {time.time() - t1:.0f} s; sampling the same prompts from both, "
        f"and from the shipped model {SHIPPED} (the full recipe, docs/models.md)"
    )
    written = {"core run": out / "core", "grown run": out / "grown"}
    for name, run, png in (
        ("samples", out / "grown", "samples.png"),
        ("core samples", out / "core", "core-samples.png"),
        (f"{SHIPPED} samples", resolve_model(SHIPPED), f"{SHIPPED}-samples.png"),
    ):
        written[name] = sample_to_png(
            run,
            out / png,
            PROMPTS[:3] if quick else PROMPTS,
            steps=4 if quick else 20,
            guidance=3.0,
            per_prompt=2 if quick else 4,
        )
    for phase in ("core", "grown"):
        written[f"{phase} metrics"] = out / phase / "metrics.jsonl"
        if (out / phase / "samples").is_dir():
            written[f"{phase} grids"] = out / phase / "samples"
    print(f"[demo] done in {time.time() - t0:.0f} s. Wrote:")
    for name, path in written.items():
        print(f"  {name:18s} {path}")
    print(
        f'  sample more:       greedygrow sample --model {SHIPPED} --out more.png "two red circles"'
    )
    print(f"  TensorBoard:       tensorboard --logdir {out}")
    return written
