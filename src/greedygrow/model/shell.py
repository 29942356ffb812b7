"""The convolutional shell around the core: R×R pixels ↔ G×G×D tokens.

Two kinds (docs/method.md, Model). *shallow*: a patchify entry conv of stride R/G, ResBlocks
at G×G, a 1×1 conv to the core width D; on the way out a 1×1 conv, ResBlocks, and a conv +
depth-to-space back to R×R. *grown*: a U-Net encoder with one level per resolution from R
down to 2G (ResBlocks, then space-to-depth + 1×1 conv halving the resolution), a 1×1 conv to
D at G×G; the decoder mirrors it, upsampling by 1×1 conv + depth-to-space and concatenating
the encoder's output of the same level as a skip connection.

A grown shell may keep the phase-1 shallow shell beside it (`inner`, function-preserving
growth): the inner shell reads the input average-pooled to its resolution and adds its tokens to
the grown encoder's, whose last conv starts at zero; its output, upsampled (nearest), is added to
the grown decoder's, whose exit conv starts at zero. So a freshly grown UViT computes
upsample(ShallowUViT(downsample(z))) exactly, and the new levels come in as they learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from greedygrow.fields import DictSpec, check_positive_ints
from greedygrow.model.layers import Conv2d, GroupNorm, Linear, checkpointed

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class ShellConfig(DictSpec):
    """Shape of a shell.

    `channels` and `blocks` have one entry per level, listed from the image resolution R
    down to 2G (encoder order); a shallow shell has exactly one level, at G×G.
    Dropout is applied only in ResBlocks whose feature map is ≤ `dropout_max_resolution`.
    """

    kind: str = "shallow"  # "shallow" | "grown"
    resolution: int = 64  # R
    grid: int = 16  # G, must equal the core's grid
    channels: tuple[int, ...] = (128,)
    blocks: tuple[int, ...] = (1,)
    dropout: float = 0.0
    dropout_max_resolution: int = 64
    norm_groups: int = 32
    inner: ShellConfig | None = None  # a shallow shell kept inside a grown one (module doc)
    core_logsnr_shift: float = 0.0  # added to λ before the core reads it (docs/method.md)

    def __post_init__(self) -> None:
        where = f"ShellConfig(kind={self.kind!r}, resolution={self.resolution}, grid={self.grid})"
        if isinstance(self.inner, dict):  # from JSON/YAML
            object.__setattr__(self, "inner", ShellConfig.from_dict(self.inner))
        if self.kind not in ("shallow", "grown"):
            raise ValueError(f"{where}: kind must be 'shallow' or 'grown'")
        check_positive_ints(self, where)
        ratio = self.resolution // self.grid
        if self.resolution % self.grid or ratio & (ratio - 1):  # ratio ≥ 1 once R % G == 0
            raise ValueError(f"{where}: the resolution must be the grid times a power of two")
        if self.kind == "grown" and ratio < 2:
            raise ValueError(
                f"{where}: a grown shell needs resolution ≥ 2 × grid (at least one level); "
                "use kind='shallow' for resolution == grid"
            )
        levels = self.levels
        if len(self.channels) != levels or len(self.blocks) != levels:
            raise ValueError(
                f"{where}: needs {levels} level(s) ({self.level_resolutions}), got "
                f"channels={self.channels} and blocks={self.blocks}; give one entry per level"
            )
        for c in self.channels:
            if not isinstance(c, int) or c < 1 or c % self.norm_groups:
                raise ValueError(
                    f"{where}: every channel count must be a positive multiple of "
                    f"norm_groups={self.norm_groups}, got channels={self.channels}"
                )
        if any(not isinstance(n, int) or n < 1 for n in self.blocks):
            raise ValueError(f"{where}: blocks must be positive ints, got {self.blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        inner = self.inner
        if inner is not None and not (
            self.kind == "grown"
            and inner.kind == "shallow"
            and inner.inner is None
            and inner.grid == self.grid
            and self.resolution % inner.resolution == 0
            and self.resolution > inner.resolution
        ):
            raise ValueError(
                f"{where}: inner must be a shallow shell on the same grid at a lower resolution "
                f"dividing {self.resolution}, inside a grown shell; got {inner}"
            )

    @property
    def levels(self) -> int:
        """Number of levels: log2(R/G) for a grown shell, 1 for a shallow one."""
        return 1 if self.kind == "shallow" else (self.resolution // self.grid).bit_length() - 1

    @property
    def patch(self) -> int:
        """Stride of the shallow shell's patchify conv, R/G (1 for a grown shell)."""
        return self.resolution // self.grid if self.kind == "shallow" else 1

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side of each level, from R down to 2G (G for a shallow shell)."""
        if self.kind == "shallow":
            return (self.grid,)
        return tuple(self.resolution >> i for i in range(self.levels))


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm·(1+scale)+shift → SiLU → dropout → conv3×3,
    plus the (1×1-projected) input. The last conv is zero-initialised, so a fresh block with
    equal in/out channels is the identity."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.modulation = Linear(cond_dim, 2 * c_out)
        self.norm2 = GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        self.skip = Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        for p in (self.modulation.weight, self.modulation.bias, self.conv2.weight, self.conv2.bias):
            nn.init.zeros_(p)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return checkpointed(self._forward, self.gradient_checkpointing, x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        shift, scale = self.modulation(emb)[:, :, None, None].chunk(2, dim=1)
        # h ← SiLU(GN(h) · (1 + scale) + shift)  (scale/shift from c; Dhariwal & Nichol 2021)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class Shell(nn.Module):
    """Encoder (pixels → [B, D, G, G]) and decoder ([B, D, G, G] → pixels) of a UViT; its
    ResBlocks take the core's conditioning vector, of the core's width D."""

    def __init__(self, config: ShellConfig, width: int) -> None:
        super().__init__()
        self.config = config
        grown = config.kind == "grown"
        ch, groups, p = config.channels, config.norm_groups, config.patch

        def level(c_first: int, i: int) -> nn.ModuleList:
            r = config.level_resolutions[i]
            drop = config.dropout if r <= config.dropout_max_resolution else 0.0
            return nn.ModuleList(
                ResBlock(c_first if j == 0 else ch[i], ch[i], width, groups, drop)
                for j in range(config.blocks[i])
            )

        # grown: a 3×3 conv at R×R; shallow: the patchify conv, p×p of stride p = R/G
        self.entry = Conv2d(IMAGE_CHANNELS, ch[0], 3 if grown else p, stride=p, padding=int(grown))
        self.down = nn.ModuleList(level(ch[i], i) for i in range(config.levels))
        # downsample ×2 between levels: space-to-depth, then 1×1 conv
        self.downsample = nn.ModuleList(
            Conv2d(4 * ch[i], ch[i + 1], 1) for i in range(config.levels - 1)
        )
        bottom = 4 * ch[-1] if grown else ch[-1]
        self.to_core = Conv2d(bottom, width, 1)
        self.from_core = Conv2d(width, bottom, 1)
        # decoder levels from the bottom (2G) up to R; a grown level's first block also
        # takes the skip from the encoder
        self.up = nn.ModuleList(
            level(2 * ch[i] if grown else ch[i], i) for i in reversed(range(config.levels))
        )
        # upsample ×2 between levels: 1×1 conv, then depth-to-space
        self.upsample = nn.ModuleList(
            Conv2d(ch[i], 4 * ch[i - 1], 1) for i in reversed(range(1, config.levels))
        )
        self.exit_norm = GroupNorm(groups, ch[0])
        self.exit = Conv2d(ch[0], IMAGE_CHANNELS * p * p, 3, padding=1)
        self.inner = None if config.inner is None else Shell(config.inner, width)
        # the exit, and with an inner shell the entry to the core, start at zero (module doc)
        for conv in (self.exit, self.to_core) if self.inner is not None else (self.exit,):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each ResBlock's activations in the backward pass (saves memory)."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.gradient_checkpointing = enabled

    def encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Pixels [B, 3, R, R] → (core input [B, D, G, G], skips from R down to 2G)."""
        grown = self.config.kind == "grown"
        # channels-last: oneDNN and cuDNN convolve NHWC without converting layouts
        h = self.entry(x.contiguous(memory_format=torch.channels_last))
        skips = []
        for i, blocks in enumerate(self.down):
            if i > 0:
                h = self.downsample[i - 1](F.pixel_unshuffle(h, 2))
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        h = self.to_core(F.pixel_unshuffle(h, 2) if grown else h)
        if self.inner is not None:  # the inner shell on the input box-downsampled to its size
            h = h + self.inner.encode(F.avg_pool2d(x, self._inner_factor), emb)[0]
        return h, skips if grown else []

    @property
    def _inner_factor(self) -> int:
        return self.config.resolution // self.config.inner.resolution

    def decode(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        """Core output [B, D, G, G] and the encoder's skips → pixels [B, 3, R, R]."""
        out = self._decode(h, skips, emb)
        if self.inner is not None:  # plus the inner shell's output, nearest-upsampled
            inner = self.inner.decode(h, [], emb)
            out = out + F.interpolate(inner, scale_factor=self._inner_factor, mode="nearest")
        return out

    def _decode(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        h = self.from_core(h)
        if self.config.kind == "grown":
            h = F.pixel_shuffle(h, 2)
        for j, blocks in enumerate(self.up):
            if j > 0:
                h = F.pixel_shuffle(self.upsample[j - 1](h), 2)
            if skips:
                h = torch.cat([h, skips[-1 - j]], dim=1)
            for block in blocks:
                h = block(h, emb)
        h = self.exit(F.silu(self.exit_norm(h)))
        h = F.pixel_shuffle(h, self.config.patch) if self.config.patch > 1 else h
        return h.contiguous()  # NCHW for the loss and the samplers
