"""Which share of a data stream this process reads: its rank among the processes."""

from __future__ import annotations

import os

import torch


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
