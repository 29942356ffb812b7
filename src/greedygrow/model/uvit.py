"""UViT = shell.encoder → core → shell.decoder, plus parameter and FLOP counts.

A Shallow-UViT is a UViT whose shell is shallow; growing builds a UViT with a grown shell
from the same CoreConfig and loads `model.core`'s state dict (docs/method.md, Model).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from greedygrow.model.core import Block, Core, CoreConfig
from greedygrow.model.layers import flop_counter
from greedygrow.model.shell import IMAGE_CHANNELS, ResBlock, Shell, ShellConfig


class UViT(nn.Module):
    """Text-conditioned v-prediction network on R×R images. `model.core` holds every core
    parameter (save, load, freeze it as a unit); `model.shell` holds the rest."""

    def __init__(self, core_config: CoreConfig, shell_config: ShellConfig) -> None:
        super().__init__()
        if shell_config.grid != core_config.grid:
            raise ValueError(
                f"UViT: the shell's grid ({shell_config.grid}) differs from the core's grid "
                f"({core_config.grid}); build the shell with grid={core_config.grid}"
            )
        self.core = Core(core_config)
        self.shell = Shell(shell_config, core_config.width)

    @property
    def core_config(self) -> CoreConfig:
        return self.core.config

    @property
    def shell_config(self) -> ShellConfig:
        return self.shell.config

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        text_pooled: Tensor,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """v̂ for noisy images z [B,3,R,R] at log-SNR [B], given text tokens [B,T,E], mask
        [B,T] (True = real token), pooled text [B,E]; where drop_text [B] is True the sample
        uses the learned null text instead. Returns [B,3,R,R] in z's dtype."""
        r = self.shell_config.resolution
        if tuple(z.shape[1:]) != (IMAGE_CHANNELS, r, r):  # the layers would fail obscurely
            raise ValueError(
                f"UViT: z must be [B, 3, {r}, {r}] for this shell, got {list(z.shape)}"
            )
        # the core reads λ + shift: 2 log(R/R₁) where its tokens are read at token SNR
        logsnr = logsnr + self.shell_config.core_logsnr_shift
        cond = self.core.embed(logsnr, text_tokens, text_mask, text_pooled, drop_text)
        h, skips = self.shell.encode(z.to(self.shell.entry.weight.dtype), cond.emb)
        b, d, g, _ = h.shape
        # the shell runs channels-last (NHWC), so [B, D, G, G] ↔ [B, G·G, D] (row-major) are views
        tokens = self.core(h.permute(0, 2, 3, 1).reshape(b, g * g, d), cond)
        h = tokens.view(b, g, g, d).permute(0, 3, 1, 2)
        return self.shell.decode(h, skips, cond.emb).to(z.dtype)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations of every core block and shell ResBlock in the backward."""
        self.core.set_gradient_checkpointing(enabled)
        self.shell.set_gradient_checkpointing(enabled)

    def compile_blocks(self) -> None:
        """torch.compile every core block and shell ResBlock in place, each as one graph
        (fullgraph: a graph break is an error). Blocks of one shape share the compiled code,
        so compiling costs one block's worth per shape, and the norms, modulation, gates and
        activations around the matrix products fuse into a few loops (docs/performance.md).

        Dynamo keeps one cache per code object: every ResBlock shape (level, decoder skip, train
        or no-grad) is an entry of ResBlock.forward's, so its limit (8 by default, an error under
        fullgraph) is raised to what this model can need."""
        blocks = [m for m in self.modules() if isinstance(m, (Block, ResBlock))]
        shapes = len(blocks) * 4  # each block × {train, no-grad} × {fp32, bf16 autocast}
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, shapes)
        for m in blocks:  # forward only: DDP/FSDP2 hooks stay eager
            m.forward = torch.compile(m.forward, fullgraph=True)

    def flops_per_image(self) -> int:
        """Forward FLOPs for one image (2 per multiply-add; matrix products only)."""
        return count_flops(self.core_config, self.shell_config)["total"]


def count_parameters(core_config: CoreConfig, shell_config: ShellConfig) -> dict[str, int]:
    """Parameters of the core and the shell, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = UViT(core_config, shell_config)
    core = sum(p.numel() for p in model.core.parameters())
    shell = sum(p.numel() for p in model.shell.parameters())
    return {"core": core, "shell": shell, "total": core + shell}


def count_flops(core_config: CoreConfig, shell_config: ShellConfig) -> dict[str, int]:
    """Forward FLOPs per image of the core (with its conditioning), the shell, and both:
    reported by the layers while a batch of one (with text_len text tokens) runs through a
    meta-device twin (no memory, no arithmetic)."""
    core, total = _flops(core_config, shell_config)
    return {"core": core, "shell": total - core, "total": total}


@functools.cache
def _flops(cc: CoreConfig, shell_config: ShellConfig) -> tuple[int, int]:
    """(core FLOPs, UViT FLOPs) of one image."""
    r = shell_config.resolution
    with torch.device("meta"):
        model = UViT(cc, shell_config)
        z, x = torch.zeros(1, IMAGE_CHANNELS, r, r), torch.zeros(1, cc.tokens, cc.width)
        text = (
            torch.zeros(1),
            torch.zeros(1, cc.text_len, cc.text_dim),
            torch.ones(1, cc.text_len, dtype=torch.bool),
            torch.zeros(1, cc.text_dim),
        )
    with torch.no_grad(), flop_counter() as core:
        model.core(x, model.core.embed(*text))
    with torch.no_grad(), flop_counter() as total:
        model(z, *text)
    return core.flops, total.flops
