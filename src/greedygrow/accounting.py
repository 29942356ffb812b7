"""What a run has cost: images seen, training FLOPs, wall and processor seconds, for its phase and
summed over every phase a grown model went through (docs/training.md, Compute accounting)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from greedygrow.config import Config, core_config, shell_config
from greedygrow.distributed import Env
from greedygrow.model import count_flops

KEYS = ("images", "train_flops", "wall_s", "cpu_s")


def train_flops_per_image(cfg: Config, core_frozen: bool) -> int:
    """Training FLOPs of one image, from the layers' own forward counts: forward + backward
    ≈ 3 × forward for trained parts (Kaplan et al. 2020, C ≈ 6N per token); a frozen core still
    carries the backward to its input, ≈ 2 × its forward. Recomputation by gradient
    checkpointing is not counted (model FLOPs, as for MFU)."""
    flops = count_flops(core_config(cfg), shell_config(cfg))
    return 3 * flops["shell"] + (2 if core_frozen else 3) * flops["core"]


def _frozen_steps(cfg: Config, steps: int) -> int:
    """How many of the first `steps` steps had the core frozen (GrowConfig.core_frozen_at:
    greedy always, unfreeze before freeze_steps)."""
    if cfg.grow.mode == "greedy":
        return steps
    return min(steps, cfg.grow.freeze_steps) if cfg.grow.mode == "unfreeze" else 0


class Account:
    """The cost of this phase so far (resumed from its state's 'compute'), and of the phases
    before it (from the grown-from model's meta; None where unknown or not grown from one)."""

    def __init__(self, cfg: Config, env: Env, saved: dict | None, before: dict | None) -> None:
        self.cfg, self.env, self.before = cfg, env, before
        saved = saved or {}
        self.wall0, self.cpu0 = float(saved.get("wall_s", 0.0)), float(saved.get("cpu_s", 0.0))
        self.tic, self.cpu_tic = time.perf_counter(), time.process_time()
        # counted once: the layers' counts of a meta-device twin
        self.per_image = {f: train_flops_per_image(cfg, f) for f in (False, True)}

    def flops(self, steps: int) -> float:
        """Training FLOPs of the first `steps` steps of this run's phase."""
        frozen = _frozen_steps(self.cfg, steps)
        # C = B · (n_frozen · c_frozen + n_trained · c_trained)
        trained = steps - frozen
        per_image = self.per_image
        return float(
            self.cfg.run.batch_size * (frozen * per_image[True] + trained * per_image[False])
        )

    def phase(self, step: int) -> dict:
        """This phase's cost after `step` steps: CPU seconds summed over the ranks (a CPU
        all-reduce under torchrun: call it on every rank)."""
        cpu = torch.tensor([time.process_time() - self.cpu_tic], dtype=torch.float64)
        if self.env.world > 1:
            dist.all_reduce(cpu)
        return {
            "images": step * self.cfg.run.batch_size,
            "train_flops": self.flops(step),
            "wall_s": self.wall0 + time.perf_counter() - self.tic,
            "cpu_s": self.cpu0 + float(cpu),
        }

    def total(self, phase: dict) -> dict | None:
        """`phase` plus the phases before it, or None where those are unknown."""
        if self.before is None:
            return None
        return {k: self.before[k] + phase[k] for k in KEYS}
