"""Seeding and counter-based random draws (SplitMix64: Steele, Lea & Flood 2014), and which
share of a stream we read."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / φ, rounded to odd
MUL1, MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser multipliers
MASK = 2**64 - 1


def _mix(values: Sequence[int]) -> int:
    """mix_seed's running hash before the final shift."""
    h = GOLDEN
    for v in values:
        h = (h ^ (int(v) & MASK)) * MUL1 & MASK
        h = (h ^ (h >> 31)) * MUL2 & MASK
    return h


def mix_seed(*values: int) -> int:
    """A 63-bit seed mixing integers (splitmix64 finaliser over a running hash)."""
    return _mix(values) >> 1


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


def _signed(c: int) -> int:
    """The int64 with the bits of the uint64 `c` (torch has no full uint64 arithmetic)."""
    return c - 2**64 if c >= 2**63 else c


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _first_rounds(x: Tensor) -> Tensor:
    """`splitmix64`'s first two xorshift-multiply rounds on int64 bits, in place."""
    x ^= _shr(x, 30)
    x *= _signed(MUL1)
    x ^= _shr(x, 27)
    x *= _signed(MUL2)
    return x


def mix_seed_tensor(values: Sequence[int], last: Tensor) -> Tensor:
    """`mix_seed(*values, v)` for every v of the int64 tensor `last`, on its device."""
    x = (last ^ _signed(_mix(values))) * _signed(MUL1)
    x ^= _shr(x, 31)
    x *= _signed(MUL2)
    return _shr(x, 1)


def _counters(keys: Tensor, first: int, count: int) -> Tensor:
    """[len(keys), count]: key + j·GOLDEN for j = first … first + count − 1, SplitMix64's state
    before its j-th output (Steele, Lea & Flood 2014)."""
    steps = torch.arange(first, first + count, device=keys.device) * _signed(GOLDEN)
    return keys[:, None] + steps


def counter_draws(keys: Tensor, count: int) -> Tensor:
    """[len(keys), count] int64 random bits: draw j (from 1) of key k is SplitMix64's j-th
    output seeded with k, splitmix64(k + j·GOLDEN), with the integer reference's bits."""
    h = _first_rounds(_counters(keys, 1, count))
    h ^= _shr(h, 31)
    return h


def unit_floats(bits: Tensor) -> Tensor:
    """float64 uniforms in [0, 1) from int64 random bits: u = (h ≫ 11) · 2^−53, the top 53."""
    return _shr(bits, 11).double() * 2.0**-53


def counter_normals(keys: Tensor, first: int, count: int) -> Tensor:
    """[len(keys), 2·count] float32 standard normals from each key's draws first … first +
    count − 1 (as `counter_draws`): with h a draw, u1 = ((h ≫ 40) + 1) · 2^−24 ∈ (0, 1] and
    u2 = (h mod 2^24) · 2^−24, Box–Muller (1958) gives z = √(−2 ln u1) · (cos 2πu2, sin 2πu2)."""
    h = _first_rounds(_counters(keys, first, count))  # the last round is folded in below
    low = h >> 31  # the draw h ^ (h ≫ 31)'s bottom 24 bits: arithmetic or logical shift alike
    low ^= h
    low &= 0xFFFFFF
    h = _shr(h, 40)  # its top 24 bits, which that last round leaves as they are
    h += 1
    r = h.float().mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    theta = low.float().mul_(2 * math.pi * 2.0**-24)
    out = torch.empty(len(keys), 2 * count, device=keys.device)
    torch.cos(theta, out=out[:, :count]).mul_(r)
    torch.sin(theta, out=out[:, count:]).mul_(r)
    return out


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
