"""The transformer core: conditioning, text, and L blocks on a G×G token grid.

The core is the part greedy growing keeps (docs/method.md, Model). Nothing in it depends on
the image size: it maps tokens [B, G·G, D] (row-major raster of the G×G grid) to tokens of
the same shape, conditioned on the log-SNR λ and on the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greedygrow.fields import DictSpec, check_positive_ints
from greedygrow.model.layers import (
    Linear,
    RMSNorm,
    attention,
    checkpointed,
    fourier_features,
    layer_norm,
    modulate,
    sincos_2d,
)


@dataclass(frozen=True)
class CoreConfig(DictSpec):
    """Shape of a core; the conditioning vector c has the core's width."""

    width: int = 192  # D
    depth: int = 6  # L
    heads: int = 6
    mlp_ratio: float = 4.0
    grid: int = 16  # G
    text_dim: int = 384  # E, the text encoder's token width
    text_len: int = 32  # most text tokens accepted per caption
    null_tokens: int = 4  # learned tokens standing in for a dropped caption
    fourier_dim: int = 256  # Fourier features of λ

    def __post_init__(self) -> None:
        check_positive_ints(self, "CoreConfig")
        if self.width % self.heads:
            raise ValueError(
                f"CoreConfig: width {self.width} is not divisible by heads {self.heads}; "
                "choose heads so that width / heads is an integer (e.g. 64)"
            )
        if self.width % 4:
            raise ValueError(f"CoreConfig: width must be divisible by 4, got {self.width}")
        if self.fourier_dim % 2:
            raise ValueError(f"CoreConfig: fourier_dim must be even, got {self.fourier_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"CoreConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def tokens(self) -> int:
        """Number of image tokens, G²."""
        return self.grid * self.grid


class Conditioning(NamedTuple):
    """What the core derives from (λ, text) once per forward and shares with the shell."""

    emb: Tensor  # silu(c) [B, C]: c = MLP(fourier(λ)) + MLP(pooled text)
    text: Tensor  # text tokens projected to the width, null tokens appended [B, T + N, D]
    text_mask: Tensor  # bool [B, 1, 1, T + N], True = attend; never all False in a row


class Attention(nn.Module):
    """Multi-head attention with q/k RMS-norm (Dehghani et al. 2023): self-attention, or
    cross-attention from image tokens to the text tokens `ctx` when `cross`."""

    def __init__(self, dim: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        if cross:
            self.q = Linear(dim, dim)
            self.kv = Linear(dim, 2 * dim)
        else:
            self.qkv = Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.out = Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        if ctx is None:
            q, k, v = self.qkv(x).view(b, n, 3, h, d // h).unbind(2)
        else:
            q = self.q(x).view(b, n, h, d // h)
            k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, d // h).unbind(2)
        # the norms act on [B, L, H, Dh] as laid out by the projection; one copy per tensor
        # to [B, H, L, Dh], the layout batched matmuls and SDPA want
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k, v = (y.transpose(1, 2).contiguous() for y in (q, k, v))
        y = attention(q, k, v, mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Linear → GELU → Linear (the exact GELU: on CPU its tanh form costs 4× as much)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Self-attention, cross-attention and MLP, each pre-norm with adaLN shift/scale/gate.

    The modulation is zero-initialised, so every gate is 0 and a fresh block is the identity
    (adaLN-Zero, DiT).
    """

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        d = config.width
        self.modulation = Linear(config.width, 9 * d)
        self.attn = Attention(d, config.heads)
        self.cross = Attention(d, config.heads, cross=True)
        self.mlp = MLP(d, round(d * config.mlp_ratio))
        self.gradient_checkpointing = False
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.modulation.weight)

    def forward(self, x: Tensor, emb: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        return checkpointed(self._forward, self.gradient_checkpointing, x, emb, text, text_mask)

    def _forward(self, x: Tensor, emb: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        mod = self.modulation(emb)[:, None].chunk(9, dim=-1)
        # x ← x + g · f(LN(x) · (1 + s) + b), for f = self-attn, cross-attn, MLP  (DiT)
        x = x + mod[2] * self.attn(modulate(layer_norm(x), mod[0], mod[1]))
        x = x + mod[5] * self.cross(modulate(layer_norm(x), mod[3], mod[4]), text, text_mask)
        return x + mod[8] * self.mlp(modulate(layer_norm(x), mod[6], mod[7]))


class Core(nn.Module):
    """The transformer core. `embed` builds the conditioning, `forward` runs the blocks."""

    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.config = config
        d, c, e = config.width, config.width, config.text_dim
        self.logsnr_mlp = nn.Sequential(Linear(config.fourier_dim, c), nn.SiLU(), Linear(c, c))
        self.pooled_mlp = nn.Sequential(Linear(e, c), nn.SiLU(), Linear(c, c))
        self.null_pooled = nn.Parameter(torch.zeros(e))
        self.text_proj = Linear(e, d)
        self.text_norm = RMSNorm(d)
        self.null_text = nn.Parameter(torch.empty(config.null_tokens, d))
        self.pos = nn.Parameter(torch.empty(config.tokens, d))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_modulation = Linear(c, 2 * d)
        self._init_weights()

    def _init_weights(self) -> None:
        for mlp in (self.logsnr_mlp, self.pooled_mlp):
            for m in mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.text_proj.weight)
        nn.init.zeros_(self.text_proj.bias)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        nn.init.normal_(self.null_text)
        with torch.no_grad():
            self.pos.copy_(sincos_2d(self.config.grid, self.config.width, self.pos.device))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass (saves memory)."""
        for block in self.blocks:
            block.gradient_checkpointing = enabled

    def embed(
        self,
        logsnr: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        text_pooled: Tensor,
        drop_text: Tensor | None = None,
    ) -> Conditioning:
        """Conditioning for a batch. Where `drop_text` is True the sample sees only the
        learned null tokens and null pooled vector; a caption with no real token is treated
        the same way (attending to nothing would be undefined)."""
        b = text_mask.shape[0]
        text_mask = text_mask.bool()
        use_null = ~text_mask.any(dim=1)
        if drop_text is not None:
            use_null = use_null | drop_text.bool()
        keep = text_mask & ~use_null[:, None]
        dtype = self.pos.dtype  # inputs follow the weights (a no-op under autocast)
        tokens = torch.where(keep[..., None], text_tokens.to(dtype), 0.0)
        pooled = torch.where(use_null[:, None], self.null_pooled, text_pooled.to(dtype))
        # fourier(λ) = [cos ωλ, sin ωλ], ω geometric in [1/128, 2] (ours; λ spans about ±20)
        lam = fourier_features(logsnr, self.config.fourier_dim, 1 / 128, 2.0).to(dtype)
        # c = MLP(fourier(λ)) + MLP(pooled text)  (docs/method.md, Model)
        c = self.logsnr_mlp(lam) + self.pooled_mlp(pooled)
        text = self.text_norm(self.text_proj(tokens))
        null = self.null_text.to(text.dtype).expand(b, -1, -1)
        mask = torch.cat([keep, use_null[:, None].expand(b, self.config.null_tokens)], dim=1)
        return Conditioning(F.silu(c), torch.cat([text, null], dim=1), mask[:, None, None, :])

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        """Tokens [B, G·G, D] (row-major G×G raster) → tokens [B, G·G, D]."""
        # a float32 residual stream under autocast, also when FSDP2 hands over bf16 parameters
        amp = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        dtype = torch.float32 if amp else self.pos.dtype
        x = x.to(dtype) + self.pos.to(dtype)
        for block in self.blocks:
            x = block(x, cond.emb, cond.text, cond.text_mask)
        shift, scale = self.final_modulation(cond.emb)[:, None].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)
