"""Seeding (SplitMix64: Steele, Lea & Flood 2014) and which share of a stream we read."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / φ, rounded to odd
MUL1, MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser multipliers
MASK = 2**64 - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixing integers (splitmix64 finaliser over a running hash)."""
    h = GOLDEN
    for v in values:
        h = (h ^ (int(v) & MASK)) * MUL1 & MASK
        h = (h ^ (h >> 31)) * MUL2 & MASK
    return h >> 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(MUL2)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, indices: Sequence[int] | np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per index: a pure function of (seed, index, stream < 8)."""
    key = splitmix64(np.array([seed * 8 + stream], dtype=np.uint64))
    idx = np.asarray(indices).astype(np.uint64)
    h = splitmix64(key + (idx + np.uint64(1)) * np.uint64(GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # u = (h ≫ 11) · 2^−53: top 53 bits


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit rank/world size, else torchrun's RANK/WORLD_SIZE, else torch.distributed."""
    if rank is not None or world_size is not None:
        r, w = rank or 0, world_size or 1
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = 0, 1
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world_size={w})")
    return r, w


def consumer(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This reader's index among all ranks × DataLoader workers, and their number."""
    r, w = rank_and_world(rank, world_size)
    info = get_worker_info()
    worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
    return r * workers + worker, w * workers
