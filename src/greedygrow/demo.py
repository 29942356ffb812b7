"""`greedygrow demo`: the whole method on the built-in scenes, CPU-sized — train a core at
32 px, grow it (greedy) to 64 px, sample the same prompts from the core and the grown model."""

from __future__ import annotations

import time
from pathlib import Path

from greedygrow.sample import sample_to_png
from greedygrow.train import grow_config, train, train_core_config

# the last two ask for colour/shape pairs that the scenes never draw (scenes.HELD_OUT)
PROMPTS = (
    "a red circle",
    "two blue squares",
    "a yellow star and a black square",
    "three green circles",
    "an orange circle",
    "a purple star",
)


def demo_overrides(quick: bool) -> tuple[list[str], list[str], int]:
    """(train-core overrides, grow overrides, grown resolution) of `greedygrow demo`.

    Sized by measurement on 2 idle cores: the cpu-mini core trains at 32 px at ~25 images/s
    and binds colours between its steps 160 and 320; the grown 64 px model trains at ~18
    images/s, and its new shell learns to use the frozen core between its steps 160 (grids
    still ignore the prompt) and 320 (they follow it like the core's). Phase 1 (320 × 32
    images) ~7 min, phase 2 (320 × 16) ~5 min, sampling < 1 min.
    """
    common = [
        "data.source=scenes",
        "run.precision=bf16",
        "data.workers=1",
        "run.log_every=5",
        "run.sample_per_prompt=2",
        "run.sample_guidance=3.0",
    ]
    if quick:
        core = [
            *common,
            "model.core=cpu-tiny",
            "model.resolution=32",
            "run.steps=20",
            "run.batch_size=8",
            "run.checkpoint_every=10",
            "run.sample_every=0",
            "run.sample_steps=4",
            "data.count=2000",
            "optim.warmup_steps=5",
        ]
        grown = [
            *common,
            "run.steps=8",
            "run.batch_size=4",
            "run.checkpoint_every=8",
            "run.sample_every=0",
            "run.sample_steps=4",
            "data.count=4000",
            "optim.warmup_steps=4",
        ]
        return core, grown, 64
    core = [
        *common,
        "model.core=cpu-mini",
        "model.resolution=32",
        "run.steps=320",
        "run.batch_size=32",
        "run.checkpoint_every=80",
        "run.sample_every=160",
        "run.sample_steps=20",
        "data.count=100000",
        "optim.warmup_steps=50",
        "optim.lr=1e-3",
        "optim.ema_decay=0.995",
    ]
    grown = [
        *common,
        "run.steps=320",
        "run.batch_size=16",
        "run.checkpoint_every=80",
        "run.sample_every=160",
        "run.sample_steps=20",
        "data.count=100000",
        "optim.warmup_steps=20",
        "optim.lr=1e-3",
        "optim.ema_decay=0.99",
    ]
    return core, grown, 64


def demo(out: str | Path, quick: bool = False) -> dict[str, Path]:
    """The whole method on scenes, CPU-sized: train a core at 32 px, grow it (greedy) to
    64 px, sample PROMPTS from both. Running it again resumes. Returns what it wrote."""
    out = Path(out)
    cache = f"data.text_cache_dir={out / 'text-cache'}"
    core_over, grow_over, res = demo_overrides(quick)
    t0 = time.time()
    print(f"[demo] phase 1: training a Shallow-UViT core at 32 px -> {out / 'core'}")
    train(train_core_config(None, [*core_over, cache]), out / "core")
    print(
        f"[demo] phase 1 took {time.time() - t0:.0f} s; phase 2: growing the core to {res} px, "
        f"frozen (greedy) -> {out / 'grown'}"
    )
    t1 = time.time()
    train(
        grow_config(str(out / "core"), res, "greedy", None, None, [*grow_over, cache]),
        out / "grown",
    )
    print(f"[demo] phase 2 took {time.time() - t1:.0f} s; sampling the same prompts from both")
    prompts = PROMPTS[:3] if quick else PROMPTS
    grids = {
        name: sample_to_png(
            out / run,
            out / png,
            prompts,
            steps=4 if quick else 20,
            guidance=3.0,
            per_prompt=2 if quick else 4,
        )
        for name, run, png in (
            ("samples", "grown", "samples.png"),
            ("core samples", "core", "core-samples.png"),
        )
    }
    written = {
        "core run": out / "core",
        "grown run": out / "grown",
        **grids,
        "core metrics": out / "core" / "metrics.jsonl",
        "grown metrics": out / "grown" / "metrics.jsonl",
    }
    for phase in ("core", "grown"):
        if (out / phase / "samples").is_dir():
            written[f"{phase} grids"] = out / phase / "samples"
    print(f"[demo] done in {time.time() - t0:.0f} s. Wrote:")
    for name, path in written.items():
        print(f"  {name:15s} {path}")
    print(
        f"  sample more:    greedygrow sample --model {out / 'grown'} --out more.png "
        '"two red circles"'
    )
    print(f"  TensorBoard:    tensorboard --logdir {out}")
    return written
