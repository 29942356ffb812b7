"""How far to trust the scenes alignment scorer: its accuracy on ground truth and degraded images.

Scores scenes against their own ground truth (so every answer should be "right") on:
crisp renders at 32–1024 px; data-set images of the high-resolution subset (drawn at native
size ≥ R, then resized to R); renders with Gaussian pixel noise; renders with Gaussian blur.
Prints a Markdown table (question accuracy per kind, all-correct prompts, ms per image).

    python benchmarks/bench_alignment.py              # 200 scenes per row (~15 min on 2 cores)
    python benchmarks/bench_alignment.py --scenes 30  # a quick look
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from greedygrow.data.scenes import native_resolutions, render, render_native, sample_scene
from greedygrow.evaluate.alignment import score_image, summarize, to_array

SEED = 9001  # scenes seed of the benchmark (any seed works; fixed for comparable numbers)


def crisp(resolution: int) -> Callable[[int], tuple]:
    def make(i: int):
        scene = sample_scene(SEED, i)
        return to_array(render(scene, resolution)), scene

    return make


def native(resolution: int, count: int) -> Callable[[int], tuple]:
    idx = np.flatnonzero(native_resolutions(SEED, np.arange(400 * count)) >= resolution)

    def make(i: int):
        scene = sample_scene(SEED, int(idx[i]))
        return to_array(render_native(scene, resolution)), scene

    return make


def noisy(resolution: int, sigma: float) -> Callable[[int], tuple]:
    def make(i: int):
        img, scene = crisp(resolution)(i)
        rng = np.random.default_rng([SEED, i])
        # x' = clip(x + σ n, 0, 1), n ~ N(0, 1) per pixel and channel (x in [0, 1])
        return np.clip(img + sigma * rng.standard_normal(img.shape), 0, 1).astype(np.float32), scene

    return make


def blurred(resolution: int, sigma: float) -> Callable[[int], tuple]:
    def make(i: int):
        img, scene = crisp(resolution)(i)
        return ndimage.gaussian_filter(img, (sigma, sigma, 0)), scene

    return make


def row(name: str, make: Callable[[int], tuple], count: int) -> str:
    results, seconds = [], 0.0
    for i in range(count):
        img, scene = make(i)
        t0 = time.perf_counter()
        results.append(score_image(img, scene))
        seconds += time.perf_counter() - t0
    s = summarize(results)
    acc = s["accuracy"]
    cells = [f"{100 * acc[k]:.1f}" if k in acc else "—" for k in ("entity", "count", "attribute")]
    return (
        f"| {name} | {s['questions']} | {100 * s['question_accuracy']:.1f} | "
        + " | ".join(cells)
        + f" | {100 * s['all_correct']:.1f} | "
        f"{1000 * seconds / count:.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=200, help="scenes per row")
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument(
        "--degrade-at",
        type=int,
        nargs="+",
        default=[64, 256],
        help="resolutions of the noise and blur rows",
    )
    args = p.parse_args()
    n = args.scenes
    print(
        f"{n} scenes per row (seed {SEED}); accuracies in %; attribute questions are asked "
        "from 128 px up\n"
    )
    print(
        "| images | questions | all questions | entity | count | attribute | prompts all "
        "correct | ms/image |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in args.resolutions:
        print(row(f"render {r} px", crisp(r), n if r < 1024 else max(n // 4, 1)), flush=True)
    for r in (x for x in args.resolutions if 128 <= x <= 512):
        print(row(f"data image {r} px (native ≥ {r})", native(r, n), n), flush=True)
    for r in args.degrade_at:
        for sigma in (0.02, 0.05, 0.1):
            print(row(f"{r} px + noise σ={sigma}", noisy(r, sigma), n), flush=True)
        for sigma in (0.5, 1.0, 2.0):
            print(row(f"{r} px + blur σ={sigma} px", blurred(r, sigma), n), flush=True)


if __name__ == "__main__":
    main()
