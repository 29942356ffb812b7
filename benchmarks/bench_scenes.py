"""Scenes throughput: how many scenes per second the built-in data set delivers.

Measures, at 64 and 512 px: sampling a scene (no pixels), drawing it directly at R, a data set
item as training reads it (drawn at native size, resized to R, as a tensor; at 512 px the
high-resolution subset, min_native=512, as the grown model trains on), and a DataLoader with 0, 1
and 2 workers. Run: `python benchmarks/bench_scenes.py [--seconds S] [--quick]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from greedygrow.data.scenes import ScenesDataset, ScenesStream, render, sample_scene


def rate(fn: Callable[[int], object], seconds: float, min_calls: int = 3) -> tuple[float, float]:
    """Calls of fn(i) per wall-clock second and per CPU second of this process (the CPU rate is
    what one quiet core gives; the wall rate drops when other processes share the cores)."""
    fn(0)
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn(calls + 1)
        calls += 1
    return calls / (time.perf_counter() - start), calls / (time.process_time() - cpu)


def loader_rate(
    resolution: int, min_native: int, workers: int, batch: int, seconds: float
) -> float:
    """Images per second out of a DataLoader over an endless ScenesStream."""
    stream = ScenesStream(resolution, seed=0, min_native=min_native)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    images, start = 0, time.perf_counter()
    for b in itertools.chain([next(it)], it):
        images += b["image"].shape[0]
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    del it
    return images / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    torch.set_num_threads(1)

    scenes = [sample_scene(0, i) for i in range(512)]
    results: dict[str, tuple[float, float] | float] = {
        "sample_scene": rate(lambda i: sample_scene(0, i), seconds),
    }
    for res, min_native, batch in ((64, 0, 32), (512, 512, 8)):
        results[f"render_{res}px"] = rate(
            lambda i, r=res: np.asarray(render(scenes[i % 512], r)), seconds
        )
        ds = ScenesDataset(200_000, res, seed=0, min_native=min_native)
        results[f"item_{res}px_min{min_native}"] = rate(lambda i, d=ds: d[i % len(d)], seconds)
        for w in args.workers:
            results[f"loader_{res}px_min{min_native}_workers{w}"] = loader_rate(
                res, min_native, w, batch, seconds
            )

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"# scenes/s — {platform.machine()}, {os.cpu_count()} cores, torch threads 1")
    print(f"{'measurement':<36} {'wall':>9} {'per CPU s':>10}")
    for name, value in results.items():
        wall, cpu = value if isinstance(value, tuple) else (value, float("nan"))
        print(f"{name:<36} {wall:9.1f} {cpu:10.1f}")


if __name__ == "__main__":
    main()
