"""Safetensors exports of weights + meta (RUN/model.safetensors, RUN/model-raw.safetensors),
strict loading, and the refusal of non-finite tensors; docs/training.md, "The run folder".
Training states are state.py's."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from greedygrow.atomic import (
    atomic_write,
    atomic_write_json,
    remove_stale_temps,
)
from greedygrow.distributed import main_process
from greedygrow.model import CoreConfig, ShellConfig, UViT

META_KEY = "greedygrow"  # safetensors header key holding the JSON meta
FORMAT_VERSION = 1


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


def refuse_nonfinite(bad: list[str], what: Path) -> None:
    """Raise NonFiniteTensors naming the tensors `bad` (if any) that kept `what` from being
    written."""
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteTensors(
            f"{what} not written: {len(bad)} tensor(s) hold NaN or inf ({shown}); what was "
            "written before is kept. Resume from the last state with a lower optim.lr"
        )


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


# safetensors' dtype names (its format: an 8-byte little-endian header length, a JSON header
# of names, dtypes, shapes and byte offsets, then the tensors' bytes; huggingface/safetensors)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _full(t: Tensor) -> Tensor:
    """`t` whole on the CPU: a DTensor (FSDP2 shards) is all-gathered, a collective."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().to("cpu").contiguous()


def _write_streamed(
    f: IO[bytes], state: Mapping[str, Tensor], metadata: dict[str, str], what: Path
) -> None:
    """Write `state` as safetensors one tensor at a time (gathered in turn where sharded), so
    no more than one full tensor is held; NaN/inf refuses the whole file (raised after the last
    tensor, so every rank takes part in every gather)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in state.items():
        end = offset + t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)) + text)
    bad = []
    for name, t in state.items():
        full = _full(t)
        if full.is_floating_point() and not bool(full.isfinite().all()):
            bad.append(name)
        f.write(full.reshape(-1).view(torch.uint8).numpy().data)
    refuse_nonfinite(bad, what)


def write_safetensors(path: Path, state: Mapping[str, Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write `state` as safetensors with `metadata` in its header, one tensor at a
    time. Where its tensors are FSDP2 shards (DTensors) every rank calls it: each tensor is
    gathered in turn and rank 0 writes it, so no rank holds more than one full tensor."""
    if main_process():
        atomic_write(path, lambda f: _write_streamed(f, state, metadata, path))
    elif any(hasattr(t, "full_tensor") for t in state.values()):  # takes part in the gathers
        with open(os.devnull, "wb") as sink:
            _write_streamed(sink, state, metadata, path)
    return path


def export_model(
    run_dir: str | os.PathLike,
    model: nn.Module | Mapping[str, Tensor],
    meta: dict,
    name: str = "model",
) -> Path:
    """Atomically write ``RUN/{name}.safetensors`` (weights, and the meta in its header, so a
    lone file is self-describing) and ``RUN/{name}.json`` (``meta``); returns the first. ``model``
    is a (wrapped) UViT or a state dict; ``meta`` must be JSON and hold the ``core`` and
    ``shell`` config dicts, taken from the model when it carries them. Where the tensors are
    FSDP2 shards every rank calls it, and rank 0 writes (:func:`write_safetensors`)."""
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
    run_dir = Path(run_dir)
    weights = write_safetensors(
        run_dir / f"{name}.safetensors", state, {"format": "pt", META_KEY: meta_text}
    )
    if not main_process():
        return weights
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
