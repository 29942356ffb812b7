"""A training run's folder (docs/training.md, The run folder): its config, checkpoints and
exports, metrics log, TensorBoard and sample grids. Written by rank 0 only."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from greedygrow.atomic import atomic_write, atomic_write_text
from greedygrow.config import (
    RESUMABLE_KEYS,
    Config,
    ConfigError,
    config_diff,
    core_config,
    default_freeze_steps,
    load_config,
    resolve,
    shell_config,
)
from greedygrow.diffusion import Schedule

log = logging.getLogger(__name__)


# keys a greedy run may change when it goes on in unfreeze mode (`_continue_unfrozen`)
UNFROZEN_KEYS = frozenset({"grow.mode", "grow.freeze_steps", "optim.core_lr_multiplier"})


def check_resume(cfg: Config, run: Path, step: int = 0) -> None:
    """Refuse to resume a run folder, from its state at `step`, whose config differs in a key
    that matters. The run's unfreeze step is kept when the new one is only the default (a
    quarter of `run.steps`, which may have grown), a greedy run may go on unfrozen, and
    stretching a cosine learning-rate schedule is warned about."""
    path = run / "config.yaml"
    if not path.is_file():
        return
    old = resolve(load_config(path))  # a key added since fills in as it was then
    grow = cfg.grow
    default = grow.freeze_steps == default_freeze_steps(grow.mode, cfg.run.steps)
    unfrozen = old.grow.mode == "greedy" and grow.mode == "unfreeze"
    if unfrozen:
        _continue_unfrozen(cfg, step, default)
    elif cfg.phase == "grow" and default and grow.freeze_steps != old.grow.freeze_steps:
        log.info(
            "keeping grow.freeze_steps=%s of the run as first written (the default, a quarter "
            "of run.steps, is fixed when a run starts)",
            old.grow.freeze_steps,
        )
        grow.freeze_steps = old.grow.freeze_steps
    if old.run.steps != cfg.run.steps and cfg.optim.schedule == "cosine":
        log.warning(
            "run.steps %d -> %d: the cosine learning-rate schedule is recomputed for the new "
            "length, so the learning rate jumps at the resumed step",
            old.run.steps,
            cfg.run.steps,
        )
    diff = config_diff(old, cfg, RESUMABLE_KEYS | UNFROZEN_KEYS if unfrozen else RESUMABLE_KEYS)
    if diff:
        raise ConfigError(
            f"{run} holds a run with another config; differing keys:\n  "
            + "\n  ".join(diff)
            + "\nUse another --out folder, or the same settings to resume it."
        )
    _check_architecture(cfg, run)


def _continue_unfrozen(cfg: Config, step: int, default: bool) -> None:
    """Let a greedy run go on in unfreeze mode. Its `step` steps are those an unfreeze run
    trains before releasing its core (shell only, `optim.core_lr_multiplier` unused), so they
    stand if the core is released at `step` or later; by default it is released at `step`."""
    grow = cfg.grow
    if default:
        grow.freeze_steps = step
    if grow.freeze_steps < step:
        raise ConfigError(
            f"grow.freeze_steps={grow.freeze_steps}: this greedy run kept its core frozen "
            f"for {step} steps, so an unfreeze run going on from it can release the core at "
            f"step {step} at the earliest; give grow.freeze_steps >= {step} (or leave it out)"
        )
    log.info(
        "going on from the greedy run's step %d in unfreeze mode: the core trains from step %d "
        "at optim.lr x %g",
        step,
        grow.freeze_steps,
        cfg.optim.core_lr_multiplier,
    )


def _check_architecture(cfg: Config, run: Path) -> None:
    """Refuse to resume when the same config names another architecture than the run's export
    (a preset changed since it started: e.g. cpu-small's heads, 6 → 3 on 2026-12-02)."""
    meta_path = run / "model.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    diff = []
    for part, now in (("core", core_config(cfg)), ("shell", shell_config(cfg))):
        was = type(now).from_dict(meta[part])  # fields added since take their defaults
        diff += [
            f"{part}.{f.name}: run {getattr(was, f.name)!r}, now {getattr(now, f.name)!r}"
            for f in dataclasses.fields(now)
            if getattr(was, f.name) != getattr(now, f.name)
        ]
    if diff:
        raise ConfigError(
            f"{run} was trained with another architecture than its config now names (a preset "
            "changed since):\n  " + "\n  ".join(diff) + "\nResume with the run's values as "
            "model.core_overrides / model.shell_overrides (e.g. model.core_overrides={heads: 6}), "
            "or start a new --out folder."
        )


def export_meta(
    cfg: Config,
    step: int,
    schedule: Schedule,
    core_drift: float | None = None,
    compute: dict | None = None,
) -> dict:
    """The meta of the exports after `step` (RUN/model.json): what inference needs besides the
    weights, the trained core's drift from phase 1 where it is tracked (unfreeze, joint), and
    what training cost (`compute`: this phase's and the total, accounting.py)."""
    meta = {
        "core": core_config(cfg).to_dict(),
        "shell": shell_config(cfg).to_dict(),
        "text_encoder": cfg.data.text_encoder,
        "text_max_length": cfg.data.text_max_length,
        "resolution": cfg.model.resolution,
        "schedule": schedule.to_dict(),
        "guidance": cfg.run.sample_guidance,
        "phase": cfg.phase,
        "mode": cfg.grow.mode,
        "step": step,
    }
    if core_drift is not None:
        meta["core_drift"] = core_drift
    if compute is not None:
        meta["compute"] = compute
    return meta


class RunLogger:
    """Rank 0's outputs: progress bar, RUN/metrics.jsonl, TensorBoard, sample grids."""

    def __init__(self, cfg: Config, run: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.metrics = run / "metrics.jsonl"
        truncate_metrics(self.metrics, start)
        self.tb = SummaryWriter(str(run / "tb"), purge_step=start or None)
        self.samples = run / "samples"
        self.bar = tqdm(
            total=cfg.run.steps,
            initial=start,
            disable=not cfg.run.progress,
            desc=f"{cfg.phase} {cfg.model.resolution}px",
            unit="step",
            dynamic_ncols=True,
        )
        self.last = start

    def log(self, step: int, values: dict) -> None:
        """One metrics line, TensorBoard scalars, and the progress bar."""
        with self.metrics.open("a") as f:
            f.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(f"train/{k}", float(v), step)
        self.bar.set_postfix(
            loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}", refresh=False
        )
        self.bar.update(step - self.last)
        self.last = step

    def grid(self, step: int, grid: Image.Image) -> None:
        """RUN/samples/step-XXXXXXX.png and the same grid in TensorBoard."""
        atomic_write(self.samples / f"step-{step:07d}.png", lambda f: grid.save(f, format="PNG"))
        pixels = np.asarray(grid.convert("RGB")).copy()
        self.tb.add_image("samples", torch.from_numpy(pixels).permute(2, 0, 1), step)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()


def truncate_metrics(path: Path, start: int) -> None:
    """Drop log lines past `start` (written by an attempt that died before its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line half-written by a kill
            continue
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))
