"""Text-encoder throughput: MiniLM captions/s, cold and warm embedding cache.

    python benchmarks/bench_text.py [--captions 1024] [--batch 64]

Captions are the built-in scenes captions, so token lengths match training.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from greedygrow.data.scenes import sample_scene
from greedygrow.text import load_text_encoder
from greedygrow.text_cache import CachedTextEncoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    captions = [sample_scene(0, i).caption for i in range(args.captions)]
    encoder = load_text_encoder("minilm", batch_size=args.batch)
    encoder.encode(captions[: args.batch])  # warm-up
    print(f"torch threads {torch.get_num_threads()}, {args.captions} scenes captions")
    tic = time.perf_counter()
    encoder.encode(captions)
    print(f"encode              {args.captions / (time.perf_counter() - tic):8.0f} captions/s")
    with tempfile.TemporaryDirectory() as cache_dir:
        with CachedTextEncoder(encoder, cache_dir) as cold:
            tic = time.perf_counter()
            cold.encode(captions)
            cold.flush()
            rate = args.captions / (time.perf_counter() - tic)
            size = cold.size_bytes() / args.captions / 1024
        print(f"cold cache (+write) {rate:8.0f} captions/s, {size:.1f} KiB per caption")
        warm = CachedTextEncoder(encoder, cache_dir)
        tic = time.perf_counter()
        for i in range(0, args.captions, args.batch):
            warm.encode(captions[i : i + args.batch])
        rate = args.captions / (time.perf_counter() - tic)
        print(f"warm cache (read)   {rate:8.0f} captions/s, misses {warm.misses}")


if __name__ == "__main__":
    main()
