"""Greedy growing: put a new shell around a phase-1 core, and freeze or unfreeze that core.

Modes (docs/method.md, Growing; Vasconcelos et al. 2024); their rules (which need a phase-1
core, which freeze_steps fit) are checked once, in config.validate:
  greedy    core from phase 1, frozen for ever (freeze_steps = -1)   — the paper's method
  unfreeze  core from phase 1, frozen for freeze_steps, then trained
  joint     core from phase 1, trained with the new shell from step 0
  scratch   no phase-1 weights: the whole UViT trained from its initialisation

Growing a grown run (docs/method.md, Growing) also keeps the levels of its shell at the
resolutions both shells share (`inherited_shell_keys`), optionally frozen (`freeze_inherited`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types

from torch import nn

from greedygrow.checkpoint import (
    CheckpointMismatch,
    load_core,
    load_part,
    load_strict,
    read_meta,
    unwrap_model,
)
from greedygrow.config import GROW_MODES
from greedygrow.model import CoreConfig, ShellConfig, UViT

log = logging.getLogger(__name__)


def _config_diff(a: CoreConfig | ShellConfig, b: CoreConfig | ShellConfig) -> list[str]:
    """``field: a vs b`` for every config field that differs."""
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
    ``mode`` is scratch, the core of ``core_source`` (a train-core or grow run folder, or a
    .safetensors file) loaded strictly, bit for bit: differing fields or tensors raise
    CheckpointMismatch. A shell with an ``inner`` shallow shell gets a train-core source's shell
    there (function-preserving growth); a grown source passes on the shell levels both shells
    share (:func:`inherit_shell`). docs/method.md, Growing."""
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
    source_shell = source_shell_config(core_source)
    if source_shell.kind == "grown":  # growing again: keep the levels both shells share
        inherit_shell(model.shell, source_shell, core_source)
    elif model.shell.inner is not None:  # function-preserving growth: the phase-1 shell inside
        state = load_part(core_source, "shell")
        load_strict(model.shell.inner, state, what=f"shallow shell of {core_source}")
    return model


def source_shell_config(source: str | os.PathLike) -> ShellConfig:
    """The shell config of the model exported in ``source`` (a run folder or .safetensors)."""
    return ShellConfig.from_dict(read_meta(source)["shell"])


def inherited_shell_keys(old: ShellConfig, new: ShellConfig) -> dict[str, str]:
    """Module names in the grown shell ``new`` → their names in the grown shell ``old`` it grows
    from. With k = log2(R_new / R_old), encoder level i (``down.i``, ``downsample.i``) of ``old``
    is level i + k of ``new``; decoder levels (``up.j``, ``upsample.j``, bottom first) and
    ``to_core``/``from_core`` keep their names. At the same resolution the whole shell is kept:
    also ``entry``, ``exit_norm``, ``exit``, and ``inner`` where both have the same."""
    where = f"growing a {old.resolution} px {old.kind} shell to {new.resolution} px"
    if old.kind != "grown" or new.kind != "grown" or old.grid != new.grid:
        raise ValueError(f"{where}: both shells must be grown, on the same grid")
    if new.resolution < old.resolution:
        raise ValueError(
            f"{where}: a grown run grows only to its own resolution ({old.resolution} px) or "
            "higher; to go lower, grow its phase-1 core run instead"
        )
    k = new.levels - old.levels
    keys = {"to_core": "to_core", "from_core": "from_core"}
    keys |= {f"down.{i + k}": f"down.{i}" for i in range(old.levels)}
    keys |= {f"downsample.{i + k}": f"downsample.{i}" for i in range(old.levels - 1)}
    keys |= {f"up.{j}": f"up.{j}" for j in range(old.levels)}
    keys |= {f"upsample.{j}": f"upsample.{j}" for j in range(old.levels - 1)}
    if k == 0:
        keys |= {name: name for name in ("entry", "exit_norm", "exit")}
    if k == 0 and new.inner is not None and new.inner == old.inner:
        keys["inner"] = "inner"
    elif new.inner is not None:
        raise ValueError(
            f"{where}: the new shell's inner shallow shell (grow.init=preserve) would come from a "
            "train-core run; a grown run passes on its levels instead: use grow.init=fresh"
        )
    return keys


def inherit_shell(shell: nn.Module, source_shell: ShellConfig, source: str | os.PathLike) -> None:
    """Copy into ``shell`` the tensors of the grown shell exported in ``source`` (of config
    ``source_shell``) under :func:`inherited_shell_keys`, bit for bit. Every tensor of a kept
    module must exist on both sides with the same shape, else CheckpointMismatch names each."""
    keys = inherited_shell_keys(source_shell, shell.config)
    old = load_part(source, "shell")
    target = shell.state_dict()
    renamed = {  # new name → old name
        new + name[len(prefix) :]: name
        for new, prefix in keys.items()
        for name in old
        if name.startswith(prefix + ".")
    }
    kept = [k for k in target if any(k.startswith(prefix + ".") for prefix in keys)]
    missing = [k for k in kept if k not in renamed]
    unexpected = [renamed[k] for k in renamed if k not in target]
    mismatched = [
        (k, tuple(old[renamed[k]].shape), tuple(target[k].shape))
        for k in kept
        if k in renamed and old[renamed[k]].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"the shell of {source} ({source_shell.resolution} px) does not fit the levels the "
            f"{shell.config.resolution} px shell keeps: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} shape-mismatched tensors",
            *(f"  missing in the source: {k} {list(target[k].shape)}" for k in missing),
            *(f"  not in the new shell:  {k} {list(old[k].shape)}" for k in unexpected),
            *(
                f"  shape: {k} {list(b)}, from source {renamed[k]} {list(a)}"
                for k, a, b in mismatched
            ),
            "Grow with the shell family and channels of the source (model.shell_family and "
            "model.shell_overrides in its config.yaml), so the levels both shells share match.",
        ]
        raise CheckpointMismatch("\n".join(lines), missing, unexpected, mismatched)
    shell.load_state_dict({k: old[name] for k, name in renamed.items()}, strict=False)
    if source_shell.resolution == shell.config.resolution and source_shell != shell.config:
        log.warning(
            "the shell of %s is kept whole, but its config differs, so the model does not start "
            "as that run's:\n  %s",
            source,
            "\n  ".join(_config_diff(source_shell, shell.config)),
        )


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen module: it stays in eval mode whatever its parent asks."""
    return nn.Module.train(self, False)


def _freeze(module: nn.Module) -> None:
    """No gradients for ``module``'s parameters (they still flow *through* it), and eval mode
    even after a parent's ``train()`` (its ``train`` is overridden on the instance, so DDP/EMA
    copies keep it)."""
    module.requires_grad_(False)
    module.train = types.MethodType(_frozen_train, module)
    module.eval()


def freeze_core(model: nn.Module) -> None:
    """Freeze ``model.core`` (wrappers looked through) for good or until :func:`unfreeze_core`."""
    _freeze(unwrap_model(model).core)


def freeze_inherited(model: nn.Module, source_shell: ShellConfig) -> None:
    """Freeze the shell modules ``model`` (wrappers looked through) inherits from a grown shell
    of config ``source_shell`` (grow.freeze_inherited: for the whole run)."""
    shell = unwrap_model(model).shell
    for name in inherited_shell_keys(source_shell, shell.config):
        _freeze(shell.get_submodule(name))


def unfreeze_core(model: nn.Module) -> None:
    """Undo :func:`freeze_core`: gradients again, and the parent's train/eval mode."""
    model = unwrap_model(model)
    model.core.requires_grad_(True)
    model.core.__dict__.pop("train", None)
    model.core.train(model.training)
