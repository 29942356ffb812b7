"""UViT = shell.encoder → core → shell.decoder, plus parameter and FLOP counts.

A Shallow-UViT is a UViT whose shell is shallow; growing builds a UViT with a grown shell
from the same CoreConfig and loads `model.core`'s state dict (DESIGN: Architecture).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from greedygrow.model.core import Core, CoreConfig
from greedygrow.model.layers import flop_counter
from greedygrow.model.shell import IMAGE_CHANNELS, Shell, ShellConfig


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
        self.shell = Shell(shell_config, core_config.width, core_config.cond_width)

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
        self._check_inputs(z, logsnr, text_tokens, text_mask, text_pooled, drop_text)
        cond = self.core.embed(logsnr, text_tokens, text_mask, text_pooled, drop_text)
        h, skips = self.shell.encode(z.to(self.shell.entry.weight.dtype), cond.emb)
        b, d, g, _ = h.shape
        tokens = self.core(h.flatten(2).transpose(1, 2), cond)  # [B, G·G, D], row-major
        h = tokens.transpose(1, 2).reshape(b, d, g, g)
        return self.shell.decode(h, skips, cond.emb).to(z.dtype)

    def _check_inputs(
        self,
        z: Tensor,
        logsnr: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor,
        text_pooled: Tensor,
        drop_text: Tensor | None,
    ) -> None:
        r, cc, b = self.shell_config.resolution, self.core_config, z.shape[0]
        if z.ndim != 4 or tuple(z.shape[1:]) != (IMAGE_CHANNELS, r, r):
            raise ValueError(
                f"UViT: z must be [B, {IMAGE_CHANNELS}, {r}, {r}] for this {r} px shell, "
                f"got {list(z.shape)}"
            )
        if text_tokens.ndim != 3 or tuple(text_tokens.shape[::2]) != (b, cc.text_dim):
            raise ValueError(
                f"UViT: text_tokens must be [B={b}, T, E={cc.text_dim}] (E = the core's "
                f"text_dim), got {list(text_tokens.shape)}"
            )
        t = text_tokens.shape[1]
        if t > cc.text_len:
            raise ValueError(
                f"UViT: {t} text tokens exceed the core's text_len {cc.text_len}; truncate "
                "captions in the text encoder (max_length)"
            )
        expected = [
            ("logsnr", logsnr, (b,)),
            ("text_mask", text_mask, (b, t)),
            ("text_pooled", text_pooled, (b, cc.text_dim)),
        ]
        if drop_text is not None:
            expected.append(("drop_text", drop_text, (b,)))
        for name, tensor, shape in expected:
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"UViT: {name} must have shape {list(shape)}, got {list(tensor.shape)}"
                )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations of every core block and shell ResBlock in the backward."""
        self.core.set_gradient_checkpointing(enabled)
        self.shell.set_gradient_checkpointing(enabled)

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
    reported by the layers while a batch of one (with text_len text tokens) runs through
    meta-device twins (no memory, no arithmetic)."""
    core = _core_flops(core_config)
    shell = _shell_flops(shell_config, core_config.width, core_config.cond_width)
    return {"core": core, "shell": shell, "total": core + shell}


@functools.cache
def _core_flops(core_config: CoreConfig) -> int:
    cc = core_config
    with torch.device("meta"):
        core = Core(cc)
        x = torch.zeros(1, cc.tokens, cc.width)
        text = (
            torch.zeros(1),
            torch.zeros(1, cc.text_len, cc.text_dim),
            torch.ones(1, cc.text_len, dtype=torch.bool),
            torch.zeros(1, cc.text_dim),
        )
    with torch.no_grad(), flop_counter() as counter:
        core(x, core.embed(*text))
    return counter.flops


@functools.cache
def _shell_flops(shell_config: ShellConfig, width: int, cond_width: int) -> int:
    r = shell_config.resolution
    with torch.device("meta"):
        shell = Shell(shell_config, width, cond_width)
        z, emb = torch.zeros(1, IMAGE_CHANNELS, r, r), torch.zeros(1, cond_width)
    with torch.no_grad(), flop_counter() as counter:
        shell.decode(*shell.encode(z, emb), emb)
    return counter.flops
