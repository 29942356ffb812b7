"""Greedy growing: put a new shell around a phase-1 core, and freeze or train that core.

Modes (DESIGN: Architecture → Growing; Vasconcelos et al. 2024):
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

from greedygrow.checkpoint import CheckpointMismatch, check_state_dict, load_core, unwrap_model
from greedygrow.config import GROW_MODES as MODES
from greedygrow.model import CoreConfig, ShellConfig, UViT


def validate_mode(mode: str, freeze_steps: int) -> None:
    """Raise ValueError unless ``mode`` and ``freeze_steps`` make sense together.

    greedy needs freeze_steps = -1 (frozen for ever); unfreeze needs freeze_steps >= 0;
    joint and scratch never freeze (freeze_steps -1 or 0).
    """
    if mode not in MODES:
        raise ValueError(f"unknown grow mode {mode!r}: choose one of {', '.join(MODES)}")
    if not isinstance(freeze_steps, int) or isinstance(freeze_steps, bool):
        raise ValueError(f"freeze_steps must be an int, got {freeze_steps!r}")
    if mode == "greedy" and freeze_steps != -1:
        raise ValueError(
            f"mode greedy keeps the core frozen for ever (freeze_steps=-1), got "
            f"freeze_steps={freeze_steps}: use mode=unfreeze to train the core "
            "after a warm-up"
        )
    if mode == "unfreeze" and freeze_steps < 0:
        raise ValueError(
            f"mode unfreeze needs freeze_steps >= 0 (steps before the core is "
            f"trained), got {freeze_steps}: use mode=greedy to freeze for ever"
        )
    if mode in ("joint", "scratch") and freeze_steps not in (-1, 0):
        raise ValueError(
            f"mode {mode} never freezes the core, but freeze_steps={freeze_steps}: "
            "use mode=unfreeze for a frozen warm-up, or drop freeze_steps"
        )


def core_is_frozen(step: int, mode: str, freeze_steps: int) -> bool:
    """Whether the core is frozen at optimizer step ``step`` (0-based) in ``mode``.

    greedy: always; unfreeze: while step < freeze_steps; joint, scratch: never.
    """
    validate_mode(mode, freeze_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if mode == "greedy":
        return True
    if mode == "unfreeze":
        return step < freeze_steps
    return False


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
    """Build ``UViT(core_config, shell_config)`` and, unless ``mode`` is scratch, load the core.

    ``core_source`` is a phase-1 run folder or exported .safetensors file. Its core is loaded
    strictly into ``model.core`` (bit for bit); a core whose config or tensors differ is refused
    with CheckpointMismatch naming the differing fields and tensors (with shapes).
    ``core_config=None`` takes the checkpoint's own core config. The shell stays randomly
    initialised. In scratch mode nothing is loaded (``core_source`` then only supplies the
    config when ``core_config`` is None). Freezing is separate: see :func:`set_core_frozen`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown grow mode {mode!r}: choose one of {', '.join(MODES)}")
    if core_source is None:
        if mode != "scratch":
            raise ValueError(
                f"mode {mode} grows a phase-1 core: pass its run folder "
                "(--core RUN), or use mode=scratch"
            )
        if core_config is None:
            raise ValueError("mode scratch without --core needs a core config")
        return UViT(core_config, shell_config)
    source_config, state = load_core(core_source)
    if core_config is None:
        core_config = source_config
    model = UViT(core_config, shell_config)
    if mode == "scratch":
        return model
    fields = _config_diff(source_config, core_config)
    try:
        check_state_dict(model.core, state, what=f"core of {core_source}")
    except CheckpointMismatch as e:
        if not fields:
            raise
        raise CheckpointMismatch(
            f"core of {core_source} has another config:\n  " + "\n  ".join(fields) + "\n" + str(e),
            e.missing,
            e.unexpected,
            e.mismatched,
        ) from None
    if fields:
        raise CheckpointMismatch(
            f"core of {core_source} has another config (its tensors fit, but the model would "
            "compute something else):\n  "
            + "\n  ".join(fields)
            + "\nGrow with the checkpoint's core config (core_config=None) or train a matching "
            "core."
        )
    model.core.load_state_dict(state, strict=True)
    return model


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen core: it stays in eval mode whatever its parent asks."""
    return nn.Module.train(self, False)


def set_core_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) ``model.core``: no gradients for its parameters, eval mode.

    A frozen core stays in eval mode when ``model.train()`` is called later (its ``train``
    is overridden on the instance, so DDP/EMA copies keep the behaviour); gradients still flow
    *through* it to the shell encoder. Unfreezing restores ``requires_grad`` and follows the
    parent's mode again. Also keep frozen parameters out of the optimizer. DDP and
    torch.compile wrappers are looked through.
    """
    model = unwrap_model(model)
    core = model.core
    core.requires_grad_(not frozen)
    if frozen:
        core.train = types.MethodType(_frozen_train, core)
        core.eval()
    else:
        core.__dict__.pop("train", None)
        core.train(model.training)


def core_frozen(model: nn.Module) -> bool:
    """Whether :func:`set_core_frozen` froze ``model.core``."""
    return "train" in unwrap_model(model).core.__dict__
