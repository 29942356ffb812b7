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
from torch.utils.flop_counter import register_flop_formula


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
    """softmax(q kᵀ / √Dh) v on [B, H, L, Dh]; `mask` is bool, True = attend.

    SDPA (flash or memory-efficient kernels), except for bf16 on CPU: there `cpu_attention`,
    as PyTorch's CPU flash kernel runs its bf16 backward at under half the speed of plain
    batched matmuls (docs/performance.md), and the core's 256-token grid keeps the
    probabilities it stores small.
    """
    if _COUNTERS:
        b, h, lq, dh = q.shape
        # FLOPs = 2 · B·H·Lq·Lk·Dh for q kᵀ, the same again for the weighted sum of v
        report_flops(4 * b * h * lq * k.shape[-2] * dh)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return cpu_attention(q * q.shape[-1] ** -0.5, k, v, mask)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.library.custom_op("greedygrow::cpu_attention", mutates_args=())
def cpu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(P v, P) with P = softmax(q kᵀ) (q already scaled); one opaque op for torch.compile,
    whose backward reuses P. Softmax accumulates in float32 also for bf16 inputs."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill_(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p @ v, p


@cpu_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((*q.shape[:-1], k.shape[-2]))


@torch.library.custom_op("greedygrow::cpu_attention_backward", mutates_args=())
def cpu_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of o = P v, P = softmax(q kᵀ): dv = Pᵀ do, dS = P ⊙ (do vᵀ − rowsum(·)),
    dq = dS k, dk = dSᵀ q (the standard softmax-attention gradient)."""
    grad = grad.contiguous()
    ds = torch._softmax_backward_data(grad @ v.transpose(-1, -2), p, -1, p.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ grad


@cpu_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, _ = inputs
    ctx.save_for_backward(q, k, v, output[1])


def _attention_backward(ctx: Any, grad: Tensor, _grad_p: Tensor) -> tuple:
    q, k, v, p = ctx.saved_tensors
    return (*cpu_attention_backward(grad, q, k, v, p), None)


cpu_attention.register_autograd(_attention_backward, setup_context=_save_for_backward)


@register_flop_formula(torch.ops.greedygrow.cpu_attention)
def _attention_flops(q: tuple, k: tuple, *_: Any, **__: Any) -> int:
    # q kᵀ and P v: 2 · 2 · B·H·Lq·Lk·Dh (what torch.utils.flop_counter counts for SDPA)
    return 4 * math.prod(q) * k[-2]


@register_flop_formula(torch.ops.greedygrow.cpu_attention_backward)
def _attention_backward_flops(grad: tuple, q: tuple, k: tuple, *_: Any, **__: Any) -> int:
    # do vᵀ, dS k, dSᵀ q and Pᵀ do: 4 · 2 · B·H·Lq·Lk·Dh
    return 8 * math.prod(q) * k[-2]


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
