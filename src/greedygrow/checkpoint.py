"""Training states (RUN/state/step-XXXXXXXX.pt), safetensors exports of weights + meta
(RUN/model.safetensors, RUN/model-raw.safetensors) and strict loading; docs/training.md, "The
run folder". Nothing is ever unpickled: states load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from greedygrow.atomic import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temps,
)
from greedygrow.model import CoreConfig, ShellConfig, UViT

log = logging.getLogger(__name__)

STATE_DIR = "state"
META_KEY = "greedygrow"  # safetensors header key holding the JSON meta
FORMAT_VERSION = 1
_STATE_RE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not fit the module they are loaded into."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []  # (name, checkpoint shape, module shape)


class NonFiniteTensors(ValueError):
    """A state or export holds NaN or ±inf: refused before anything is written."""


def nonfinite_tensors(obj: Any, where: str = "") -> list[str]:
    """The names (key paths) of the floating-point tensors in `obj` (nested dicts and lists)
    holding a NaN or ±inf."""
    if isinstance(obj, Tensor):
        return [] if not obj.is_floating_point() or bool(obj.isfinite().all()) else [where]
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [name for k, v in items for name in nonfinite_tensors(v, f"{where}/{k}".lstrip("/"))]


def _refuse_nonfinite(obj: Any, what: Path) -> None:
    if bad := nonfinite_tensors(obj):
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteTensors(
            f"{what} not written: {len(bad)} tensor(s) hold NaN or inf ({shown}); the files "
            "written before are kept. Resume from the last state with a lower optim.lr"
        )


# ---------------------------------------------------------------------------------------------
# training states

_LEAF_TYPES = (
    Tensor,
    int,
    float,
    bool,
    str,
    bytes,
    complex,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError at save time for values ``torch.load(weights_only=True)`` cannot read."""
    if isinstance(obj, _LEAF_TYPES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(
                    f"state key {where}[{k!r}] has type {type(k).__name__}; use str or int keys"
                )
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot read back; store tensors, numbers, strings, "
        "lists and dicts only (e.g. torch.as_tensor(x) for numpy arrays, cfg.to_dict() for configs)"
    )


def state_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``RUN/state/step-XXXXXXXX.pt`` for ``step``."""
    return Path(run_dir) / STATE_DIR / f"step-{step:08d}.pt"


def list_states(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All saved training states of a run as (step, path), oldest first."""
    directory = Path(run_dir) / STATE_DIR
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STATE_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_state(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 3) -> Path:
    """Atomically save a training state as ``RUN/state/step-XXXXXXXX.pt``; keep the last ``keep``.
    ``state`` must load back with ``torch.load(weights_only=True)``: tensors, numbers, strings
    and nested dicts/lists only, which is checked before anything is written."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_state: step must be an int >= 0, got {step!r}")
    _check_loadable(state, "state")
    path = state_path(run_dir, step)
    _refuse_nonfinite(state, path)
    atomic_write(path, lambda f: torch.save(state, f))
    remove_stale_temps(path.parent)
    for _, old in list_states(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def load_latest_state(
    run_dir: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> tuple[int, dict] | None:
    """The newest readable training state as (step, state), or None if the run has none; an
    unreadable one (truncated, corrupt) is skipped with a warning naming it and the error."""
    for step, path in reversed(list_states(run_dir)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # any unreadable file: fall back to the previous state
            log.warning(
                "training state %s is unreadable (%s: %s); falling back to the one before it",
                path,
                type(e).__name__,
                e,
            )
            continue
        return step, state
    return None


# ---------------------------------------------------------------------------------------------
# exported weights


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _export_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies; tensors sharing storage (tied weights) get their own copy."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if type(t) is not Tensor and not isinstance(t, nn.Parameter):
            raise TypeError(
                f"export: {name} is a {type(t).__name__}, not a plain tensor (sharded?); gather "
                "a full CPU state dict first, e.g. torch.distributed.checkpoint.state_dict."
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                "cpu_offload=True))"
            )
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # tied, or a view into a larger buffer: safetensors needs its own
        if t.numel() > 0:
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def export_model(
    run_dir: str | os.PathLike,
    model: nn.Module | Mapping[str, Tensor],
    meta: dict,
    name: str = "model",
) -> Path:
    """Atomically write ``RUN/{name}.safetensors`` (weights, and the meta in its header, so a
    lone file is self-describing) and ``RUN/{name}.json`` (``meta``); returns the first. ``model``
    is a (wrapped) UViT or a full state dict; ``meta`` must be JSON and hold the ``core`` and
    ``shell`` config dicts, taken from the model when it carries them."""
    meta = dict(meta)
    if isinstance(model, nn.Module):
        model = unwrap_model(model)
        for key, attr in (("core", "core_config"), ("shell", "shell_config")):
            cfg = getattr(model, attr, None)
            if key not in meta and cfg is not None:
                meta[key] = cfg.to_dict()
        state = model.state_dict()
    else:
        state = dict(model)
    for key in ("core", "shell"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(
                f"export_model: meta[{key!r}] must be the {key} config dict "
                f"(CoreConfig/ShellConfig.to_dict()), got {meta.get(key)!r}"
            )
    meta.setdefault("format_version", FORMAT_VERSION)
    meta_text = json.dumps(meta, sort_keys=True, allow_nan=False)  # raises on non-JSON meta
    tensors = _export_tensors(state)
    run_dir = Path(run_dir)
    weights = run_dir / f"{name}.safetensors"
    _refuse_nonfinite(tensors, weights)
    atomic_write_bytes(
        weights, safetensors_bytes(tensors, metadata={"format": "pt", META_KEY: meta_text})
    )
    atomic_write_json(run_dir / f"{name}.json", meta)
    for suffix in (".safetensors.", ".json."):
        remove_stale_temps(run_dir, name + suffix)
    return weights


def _exported(source: str | os.PathLike, ema: bool = True) -> tuple[Path, dict]:
    """The weights file of a run folder (EMA or raw) or a .safetensors file, and its meta: the
    sibling JSON if present, else the safetensors header."""
    weights = Path(source)
    if weights.is_dir():
        weights = weights / ("model.safetensors" if ema else "model-raw.safetensors")
        if not weights.is_file():
            raise FileNotFoundError(
                f"{source} has no {weights.name}: train it first or point --model at a run folder"
            )
    elif not weights.exists():
        raise FileNotFoundError(
            f"{source} does not exist: point --model/--core at a run folder "
            "(one holding model.safetensors) or a .safetensors file"
        )
    elif weights.suffix != ".safetensors":
        raise ValueError(f"{source} is neither a run folder nor a .safetensors file")
    meta_path = weights.with_suffix(".json")
    if meta_path.is_file():
        try:
            return weights, json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e}); re-export the model") from e
    with safe_open(weights, framework="pt") as f:
        header = f.metadata() or {}
    if META_KEY not in header:
        raise ValueError(
            f"{weights} carries no greedygrow meta and {meta_path.name} is missing: "
            "it was not written by greedygrow.checkpoint.export_model"
        )
    return weights, json.loads(header[META_KEY])


def read_meta(source: str | os.PathLike, ema: bool = True) -> dict:
    """The exported meta of a run folder or .safetensors file (core/shell config, text, ...)."""
    return _exported(source, ema)[1]


def _config_from_meta(meta: dict, key: str, cls: type, where: Path) -> Any:
    if not isinstance(meta.get(key), dict):
        raise ValueError(f"{where}: meta has no {key!r} config dict; re-export the model")
    try:
        return cls.from_dict(meta[key])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: invalid {key} config {meta[key]!r}: {e}") from e


def load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """``module.load_state_dict(state, strict=True)``; a mismatch raises CheckpointMismatch
    listing every missing, unexpected and shape-mismatched tensor by name (with both shapes)
    and what to do. On a mismatch ``module`` may be left partly loaded: build a fresh one."""
    try:
        module.load_state_dict(state, strict=True)
        return
    except RuntimeError:
        pass
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    lines = [
        f"{what} does not fit {type(module).__name__}: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} shape-mismatched tensors",
        *(f"  missing:    {k} {list(expected[k].shape)}" for k in missing),
        *(f"  unexpected: {k} {list(state[k].shape)}" for k in unexpected),
        *(f"  shape:      {k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched),
        "It was written for another configuration: build the model from the checkpoint's own "
        "config (its model.json), or use a checkpoint trained with this configuration.",
    ]
    raise CheckpointMismatch("\n".join(lines), missing, unexpected, mismatched) from None


def load_model(
    run_dir: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[UViT, dict]:
    """The exported UViT of a run folder (EMA weights by default) in eval mode, and its meta
    (the dict given to :func:`export_model`)."""
    weights, meta = _exported(run_dir, ema)
    core = _config_from_meta(meta, "core", CoreConfig, weights)
    shell = _config_from_meta(meta, "shell", ShellConfig, weights)
    model = UViT(core, shell)
    load_strict(model, load_file(weights, device="cpu"), what=str(weights))
    return model.to(device).eval(), meta


def load_core(source: str | os.PathLike) -> tuple[CoreConfig, dict[str, Tensor]]:
    """The core config and core weights (keys relative to ``model.core``, the only tensors
    read) of a run folder's EMA export or a .safetensors file written by :func:`export_model`."""
    weights, meta = _exported(source)
    return _config_from_meta(meta, "core", CoreConfig, weights), load_part(source, "core")


def load_part(source: str | os.PathLike, part: str) -> dict[str, Tensor]:
    """The weights of ``model.<part>`` (keys relative to it, the only tensors read) of a run
    folder's EMA export or a .safetensors file written by :func:`export_model`."""
    weights, _ = _exported(source)
    prefix = f"{part}."
    with safe_open(weights, framework="pt", device="cpu") as f:
        names = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open)
        state = {k[len(prefix) :]: f.get_tensor(k) for k in names}
    if not state:
        raise ValueError(f"{weights} holds no '{prefix}*' tensors: it is not an exported UViT")
    return state
