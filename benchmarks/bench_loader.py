"""Loader throughput (images/s out of a DataLoader) for scenes and WebDataset shards.

Both built with `greedygrow.data.make_dataset`, as training builds them, at 64 px (phase 1: all
data) and 512 px (phase 2: the high-resolution subset, min_native=512), with 0, 1 and 2
DataLoader workers. The shards hold synthetic photo-like JPEGs (a smooth random field plus
grain, 768×576, quality 90: web-photo entropy, shorter side ≥ 512) with txt and json members,
as img2dataset writes them. Worker start-up and the first batch are not counted.
Run: `python benchmarks/bench_loader.py [--seconds S] [--quick]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from greedygrow.data import make_dataset


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field (upsampled 12×9 noise) plus per-pixel grain."""
    coarse = rng.uniform(0, 255, (9, 12, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def write_shards(out: Path, images: int, shards: int, size: tuple[int, int]) -> tuple[str, float]:
    """img2dataset-style shards; returns their brace pattern and the mean JPEG size in KB."""
    rng = np.random.default_rng(0)
    per_shard = -(-images // shards)
    total_bytes = 0
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                buf = io.BytesIO()
                photo_like(rng, *size).save(buf, "JPEG", quality=90)
                meta = {
                    "caption": f"photo {i}",
                    "width": size[0],
                    "height": size[1],
                    "original_width": size[0],
                    "original_height": size[1],
                }
                members = {
                    "jpg": buf.getvalue(),
                    "txt": f"photo {i}".encode(),
                    "json": json.dumps(meta).encode(),
                }
                total_bytes += len(members["jpg"])
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"{{00000..{shards - 1:05d}}}.tar"), total_bytes / images / 1024


def loader_rate(dataset, workers: int, batch: int, seconds: float) -> tuple[float, float | None]:
    """Images per wall-clock second over about `seconds` after the first batch, and (without
    workers, where all the work is in this process) images per CPU second of this process."""
    shuffle = not isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=batch, shuffle=shuffle, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        try:
            images += len(next(it)["key"])
        except StopIteration:
            break
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    del it
    return images / elapsed, (images / cpu if workers == 0 else None)


def table(rows: list[dict], workers: list[int]) -> str:
    """Markdown: one line per (source, R), a column per worker count, then per CPU second."""
    head = " | ".join(f"{w} workers" for w in workers)
    lines = [
        f"| source | R | min_native | {head} | per CPU s (0 workers) |",
        "|---|---:|---:|" + "---:|" * (len(workers) + 1),
    ]
    for source, res in dict.fromkeys((r["source"], r["resolution"]) for r in rows):
        cells = [r for r in rows if (r["source"], r["resolution"]) == (source, res)]
        rates = " | ".join(f"{r['images_per_s']:.0f}" for r in cells)
        cpu = next((r["images_per_cpu_s"] for r in cells if r["images_per_cpu_s"]), None)
        cpu_text = "—" if cpu is None else f"{cpu:.0f}"
        lines.append(f"| {source} | {res} | {cells[0]['min_native']} | {rates} | {cpu_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--quick", action="store_true", help="2 s per measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--resolutions", type=int, nargs="*", default=[64, 512])
    parser.add_argument("--sources", nargs="*", default=["scenes", "webdataset"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=400, help="images in the shards")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pattern, kb = write_shards(Path(tmp), args.images, 4, (768, 576))
        for source in args.sources:
            for res in args.resolutions:
                min_native = 0 if res <= 64 else res
                if source == "scenes":  # a fixed set large enough that the subset is not tiny
                    ds = make_dataset("scenes", None, res, min_native=min_native, count=20_000)
                else:
                    ds = make_dataset("webdataset", pattern, res, min_native=min_native)
                for w in args.workers:
                    rate, per_cpu = loader_rate(ds, w, args.batch, seconds)
                    rows.append(
                        {
                            "source": source,
                            "resolution": res,
                            "min_native": min_native,
                            "workers": w,
                            "images_per_s": round(rate, 1),
                            "images_per_cpu_s": per_cpu and round(per_cpu, 1),
                        }
                    )
    if args.json:
        machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
        print(json.dumps({**machine, "jpeg_kb": round(kb, 1), "rows": rows}))
        return
    print(
        f"shards: {args.images} JPEGs 768×576 q90, {kb:.0f} KB each; batch {args.batch}; "
        f"{seconds:.0f} s per measurement; load average {os.getloadavg()[0]:.1f}"
    )
    print(table(rows, args.workers))


if __name__ == "__main__":
    main()
