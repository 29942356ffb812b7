"""Greedy growing: put a new shell around a phase-1 core, and freeze or unfreeze that core.

Modes (docs/method.md, Growing; Vasconcelos et al. 2024); their rules (which need a phase-1
core, which freeze_steps fit) are checked once, in config.validate:
  greedy    core from phase 1, frozen for ever (freeze_steps = -1)   — the paper's method
  unfreeze  core from phase 1, frozen for freeze_steps, then trained
  joint     core from phase 1, trained with the new shell from step 0
  scratch   no phase-1 weights: the whole UViT trained from its initialisation
"""

from __future__ import annotations

import dataclasses
import os
import types

from torch import nn

from greedygrow.checkpoint import CheckpointMismatch, load_core, load_strict, unwrap_model
from greedygrow.config import GROW_MODES
from greedygrow.model import CoreConfig, ShellConfig, UViT


def _config_diff(a: CoreConfig, b: CoreConfig) -> list[str]:
    """``field: a vs b`` for every CoreConfig field that differs."""
    return [
        f"{f.name}: checkpoint {getattr(a, f.name)!r} vs requested {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def grow(
    core_source: str | os.PathLike | None,
    core_config: CoreConfig | None,
    shell_config: ShellConfig,
    mode: str,
) -> UViT:
    """``UViT(core_config, shell_config)`` (None: the checkpoint's core config) with, unless
    ``mode`` is scratch, the core of ``core_source`` (a phase-1 run folder or .safetensors file)
    loaded strictly, bit for bit: differing fields or tensors raise CheckpointMismatch."""
    if mode not in GROW_MODES:
        raise ValueError(f"unknown grow mode {mode!r}: choose one of {', '.join(GROW_MODES)}")
    if core_source is None:
        if mode != "scratch" or core_config is None:
            raise ValueError(
                f"mode {mode} grows a phase-1 core: pass its run folder (--core RUN), or use "
                "mode=scratch with a core config"
            )
        return UViT(core_config, shell_config)
    source_config, state = load_core(core_source)
    model = UViT(core_config or source_config, shell_config)
    if mode == "scratch":
        return model
    fields = _config_diff(source_config, model.core_config)
    differ = f"core of {core_source} has another config:\n  " + "\n  ".join(fields) + "\n"
    try:
        load_strict(model.core, state, what=f"core of {core_source}")
    except CheckpointMismatch as e:
        message = differ + str(e) if fields else str(e)
        raise CheckpointMismatch(message, e.missing, e.unexpected, e.mismatched) from None
    if fields:
        raise CheckpointMismatch(
            differ + "Its tensors fit, but the model would compute something else: grow with "
            "the checkpoint's core config (core_config=None) or train a matching core."
        )
    return model


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen core: it stays in eval mode whatever its parent asks."""
    return nn.Module.train(self, False)


def freeze_core(model: nn.Module) -> None:
    """Freeze ``model.core`` (wrappers looked through): no gradients for its parameters (they
    still flow *through* it), and eval mode even after ``model.train()`` (its ``train`` is
    overridden on the instance, so DDP/EMA copies keep it)."""
    core = unwrap_model(model).core
    core.requires_grad_(False)
    core.train = types.MethodType(_frozen_train, core)
    core.eval()


def unfreeze_core(model: nn.Module) -> None:
    """Undo :func:`freeze_core`: gradients again, and the parent's train/eval mode."""
    model = unwrap_model(model)
    model.core.requires_grad_(True)
    model.core.__dict__.pop("train", None)
    model.core.train(model.training)
