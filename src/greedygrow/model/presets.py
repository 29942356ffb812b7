"""Named model presets, as data, from CPU-sized to the paper's scale.

Cores: `cpu-*` train on a laptop CPU (speeds in docs/performance.md); `paper-*` are about
0.5B, 2B and 8B parameters like the paper's models (their widths and depths are ours; the paper
does not publish them). Shells come in families: a family fixes
the channel width and block count of each level by its size relative to the grid (level k
has side G·2^k), so one family gives a shell for every resolution G·2^k up to its deepest
level. `cpu` is narrow, `paper` is full-sized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from greedygrow.model.core import CoreConfig
from greedygrow.model.shell import ShellConfig
from greedygrow.model.uvit import count_flops, count_parameters

# heads of 64 channels, as in ViT and DiT (cpu-small is ViT-Ti's 192 × 3); cpu-tiny keeps two
# heads of 32 rather than one
CORE_PRESETS: dict[str, CoreConfig] = {
    "cpu-tiny": CoreConfig(width=64, depth=4, heads=2),
    "cpu-mini": CoreConfig(width=128, depth=4, heads=2),
    "cpu-small": CoreConfig(width=192, depth=6, heads=3),
    "cpu-base": CoreConfig(width=256, depth=8, heads=4),
    "paper-0.5b": CoreConfig(width=1024, depth=20, heads=16),
    "paper-2b": CoreConfig(width=2048, depth=20, heads=16),
    "paper-8b": CoreConfig(width=3072, depth=34, heads=24),
}


@dataclass(frozen=True)
class ShellFamily:
    """Channel widths and ResBlocks per level, indexed by level k = 1, 2, ... (side G·2^k)."""

    shallow_channels: int
    channels: tuple[int, ...]
    blocks: tuple[int, ...]
    norm_groups: int = 32
    shallow_blocks: int = 1


SHELL_FAMILIES: dict[str, ShellFamily] = {
    "cpu": ShellFamily(
        shallow_channels=64,
        channels=(64, 32, 32, 16, 16, 8),
        blocks=(1, 1, 1, 1, 1, 1),
        norm_groups=8,
    ),
    "paper": ShellFamily(
        shallow_channels=256,
        channels=(512, 256, 128, 128, 64, 64),
        blocks=(2, 2, 2, 2, 2, 2),
    ),
}


def core_preset(name: str, **overrides: Any) -> CoreConfig:
    """The core preset `name`, with fields replaced by `overrides` (e.g. text_dim=768)."""
    if name not in CORE_PRESETS:
        raise ValueError(f"unknown core preset {name!r}; choose one of {sorted(CORE_PRESETS)}")
    return dataclasses.replace(CORE_PRESETS[name], **overrides)


def shell_preset(
    kind: str, resolution: int, family: str = "paper", grid: int = 16, **overrides: Any
) -> ShellConfig:
    """A `kind` ("shallow" | "grown") shell for `resolution` px from the shell `family`.

    Raises ValueError, before anything is built, when the resolution is not reachable
    (not grid × a power of two, or deeper than the family's levels).
    """
    if family not in SHELL_FAMILIES:
        raise ValueError(f"unknown shell family {family!r}; choose one of {sorted(SHELL_FAMILIES)}")
    fam = SHELL_FAMILIES[family]
    if kind == "shallow":
        kw: dict[str, Any] = {"channels": (fam.shallow_channels,), "blocks": (fam.shallow_blocks,)}
    else:
        reachable = [grid * 2**k for k in range(1, len(fam.channels) + 1)]
        if resolution not in reachable:
            raise ValueError(
                f"shell family {family!r} grows a {grid}×{grid} core to "
                f"{', '.join(map(str, reachable))} px (they reach at most {reachable[-1]} px); "
                f"{resolution} px is not one of them"
            )
        levels = reachable.index(resolution) + 1
        kw = {"channels": fam.channels[:levels][::-1], "blocks": fam.blocks[:levels][::-1]}
    kw.update(kind=kind, resolution=resolution, grid=grid, norm_groups=fam.norm_groups)
    return ShellConfig(**{**kw, **overrides})


SHELL_PRESETS: dict[str, ShellConfig] = {
    "cpu-shallow-32": shell_preset("shallow", 32, "cpu"),
    "cpu-shallow-64": shell_preset("shallow", 64, "cpu"),
    **{f"cpu-grown-{r}": shell_preset("grown", r, "cpu") for r in (64, 128, 256, 512)},
    "paper-shallow-64": shell_preset("shallow", 64, "paper"),
    **{f"paper-grown-{r}": shell_preset("grown", r, "paper") for r in (128, 256, 512, 1024)},
}


def preset_family(name: str) -> str:
    """The family of a preset name: its prefix before the first "-" ("cpu" or "paper")."""
    return name.split("-")[0]


def preset_table(family: str | None = None) -> list[dict[str, Any]]:
    """One row per (core preset, shell preset) of the same family (or of `family` only):
    parameters (core, shell) and forward FLOPs per image, computed on the meta device."""
    rows = []
    for core_name, core in CORE_PRESETS.items():
        for shell_name, shell in SHELL_PRESETS.items():
            own = preset_family(core_name)
            if own != preset_family(shell_name) or family not in (None, own):
                continue
            params, flops = count_parameters(core, shell), count_flops(core, shell)
            rows.append(
                {
                    "core": core_name,
                    "shell": shell_name,
                    "kind": shell.kind,
                    "resolution": shell.resolution,
                    "core_params": params["core"],
                    "shell_params": params["shell"],
                    "core_flops": flops["core"],
                    "shell_flops": flops["shell"],
                    "flops_per_image": flops["total"],
                }
            )
    return rows
