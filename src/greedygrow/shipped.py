"""Models shipped inside the package (greedygrow/weights/NAME), addressable by name from any
directory: `--model scenes-128`, `--core scenes-128`, `greedygrow models` (docs/models.md).

A shipped model is a run folder cut down to what sampling, evaluating and growing read: the
EMA weights in bf16 (model.safetensors + model.json, whose "card" holds the recipe's figures),
config.yaml, and the config.yaml of every run it was grown from, in core/ (grow.core made
relative to the folder, so the copy works wherever the package is installed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from greedygrow.checkpoint import export_model, read_meta
from greedygrow.config import load_config, run_config, save_config

SHIPPED_DIR = Path(__file__).parent / "weights"
PHASE1_FOLDER = "core"  # where a shipped model keeps the config of the run it was grown from


def shipped_models() -> dict[str, Path]:
    """Name → folder of every model shipped with the package, sorted by name."""
    if not SHIPPED_DIR.is_dir():
        return {}
    found = (p for p in SHIPPED_DIR.iterdir() if (p / "model.safetensors").is_file())
    return {p.name: p for p in sorted(found)}


def resolve_model(source: str | os.PathLike) -> Path:
    """A run folder or .safetensors file as given, else the shipped model of that name."""
    path = Path(source)
    if path.exists():
        return path
    models = shipped_models()
    if str(source) in models:
        return models[str(source)]
    names = ", ".join(models) or "none"
    raise FileNotFoundError(
        f"{source}: no such run folder or .safetensors file, and no shipped model of that name "
        f"(shipped: {names}; `greedygrow models` lists them)"
    )


def ship(run: str | os.PathLike, out: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write the run folder `run`'s EMA export to `out` as a shipped model: bf16 weights (same
    meta, plus `card`), its config and those of the runs it grew from; returns `out`."""
    run, out = Path(run), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {**read_meta(run), "card": card}
    tensors = load_file(run / "model.safetensors")
    # bf16 halves the file; sampling already runs the matmuls in bf16 (docs/models.md)
    export_model(tmp, {k: _bf16(t) for k, t in tensors.items()}, meta)
    _ship_config(run, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16) if t.is_floating_point() else t


def _ship_config(run: Path, dest: Path) -> None:
    """dest/config.yaml from run's, caches dropped and grow.core pointing at dest/core, which
    gets the same treatment (recursively, for a model grown more than once)."""
    cfg = run_config(run)
    cfg.data.text_cache_dir = cfg.data.scene_cache_dir = None
    if cfg.grow.core and cfg.grow.mode != "scratch":
        _ship_config(Path(cfg.grow.core), dest / PHASE1_FOLDER)
        cfg.grow.core = PHASE1_FOLDER
    elif cfg.grow.core:  # scratch: the run only took the core's shape, which its config holds
        cfg.grow.core = None
    dest.mkdir(parents=True, exist_ok=True)
    save_config(cfg, dest / "config.yaml")
    load_config(dest / "config.yaml")  # what was written reads back


def describe(name: str, folder: Path) -> str:
    """One shipped model as `greedygrow models` prints it."""
    meta = read_meta(folder)
    card = meta.get("card", {})
    megabytes = (folder / "model.safetensors").stat().st_size / 2**20
    lines = [f"{name}  ({meta.get('resolution', '?')} px, {megabytes:.0f} MB)  {folder}"]
    lines += [f"  {k}: {_text(v)}" for k, v in card.items()]
    return "\n".join(lines)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
