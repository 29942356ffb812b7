"""Building blocks shared by the core and the shell.

Layers that do matrix products report their own FLOPs while a `flop_counter()` is open
(k-diffusion style), so FLOPs per image are computed by running the model, on the meta
device, not typed in as a formula. Convention: one multiply-add = 2 FLOPs; only matrix
products (linear, convolution, attention scores and mixing) are counted, as in the usual
model-FLOP-utilisation accounting (PaLM; k-diffusion). Norms run in float32 so the layers
are safe under bf16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class FlopCounter:
    """Accumulates the FLOPs reported by layers while it is open."""

    flops: int = 0


_COUNTERS: list[FlopCounter] = []


@contextmanager
def flop_counter() -> Iterator[FlopCounter]:
    """Open a counter; every counted layer run inside the block adds its FLOPs to it."""
    counter = FlopCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def report_flops(flops: int) -> None:
    """Add `flops` to every open counter (a no-op, and no graph break, when none is open)."""
    for counter in _COUNTERS:
        counter.flops += int(flops)


class Linear(nn.Linear):
    """nn.Linear that reports its FLOPs."""

    def forward(self, x: Tensor) -> Tensor:
        if _COUNTERS:
            # FLOPs = 2 · rows · in · out = 2 · numel(x) · out
            report_flops(2 * x.numel() * self.out_features)
        return super().forward(x)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that reports its FLOPs."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if _COUNTERS:
            kh, kw = self.kernel_size
            # FLOPs = 2 · numel(y) · (C_in / groups) · kh · kw
            report_flops(2 * y.numel() * (self.in_channels // self.groups) * kh * kw)
        return y


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on [B, H, L, Dh]; `mask` is bool, True = attend."""
    if _COUNTERS:
        b, h, lq, dh = q.shape
        # FLOPs = 2 · B·H·Lq·Lk·Dh for q kᵀ, the same again for the weighted sum of v
        report_flops(4 * b * h * lq * k.shape[-2] * dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    """RMS norm with a learned scale, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # y = x / sqrt(mean(x²) + eps) · w  (Zhang & Sennrich 2019)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without affine parameters, computed in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (affine) computed in float32, returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x · (1 + scale) + shift  (DiT, Peebles & Xie 2023)."""
    return x * (1 + scale) + shift


def fourier_features(x: Tensor, dim: int, min_freq: float, max_freq: float) -> Tensor:
    """[cos ω x, sin ω x] for dim/2 angular frequencies ω spaced geometrically; x [B] → [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), half, device=x.device))
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid: int, dim: int, device: torch.device | None = None) -> Tensor:
    """2-D sine-cosine position code for a grid×grid raster (row-major) → [grid², dim].

    dim must be divisible by 4 (CoreConfig checks the width). Half the channels encode the
    row, half the column, each as [sin ω p, cos ω p] with ω = 10000^(-i / (dim/4))
    (Vaswani et al. 2017; MAE/DiT 2-D variant).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    pos = torch.arange(grid, device=device, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def code(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    return torch.cat([code(rows), code(cols)], dim=-1)


def checkpointed(fn: Any, enabled: bool, *args: Any) -> Any:
    """fn(*args), recomputed in the backward pass when `enabled` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
