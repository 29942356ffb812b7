"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2 §3 and App. C.1-C.2).

Training tracks a few power-function EMAs (`PowerEMA`) and saves them now and then
(`save_snapshot`); afterwards `synthesize` rebuilds the EMA of any other length σ_rel as a
least-squares combination of the snapshots.

Time: the update numbered ``step`` (1-based) covers the time interval (step-1, step], so t = step.
With β = (1 - 1/t)^(γ+1) the recursion telescopes, t^(γ+1)·ema_t = (t-1)^(γ+1)·ema_{t-1} +
(t^(γ+1) - (t-1)^(γ+1))·θ_t, so the EMA after step t weighs θ_i by i^(γ+1) - (i-1)^(γ+1)
= ∫_{i-1}^{i} (γ+1)τ^γ dτ: it is exactly the continuous profile (γ+1)τ^γ/t^(γ+1) on [0, t] applied
to the piecewise-constant θ(τ) = θ_i on (i-1, i]. Weights ∝ i^γ hold only approximately (relative
error about γ/(2i)). What makes synthesis approximate is the least-squares fit of the target profile
by the snapshot profiles (in the continuous L2 inner product over [0, t]), plus float32 storage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from greedygrow.checkpoint import export_model, read_meta, write_safetensors
from greedygrow.config import SIGMA_REL_MAX, run_config, save_config

SNAPSHOT_DIR = "ema"  # RUN/ema/ema-XXXXXXXX.safetensors


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ > 0 of the power-function profile with relative std ``sigma_rel``.

    Valid range: 0 < σ_rel < 1/√12 ≈ 0.2887 (γ from +∞ down to 0). Larger σ_rel would need
    γ < 0, a profile that weighs early training most, up to σ_rel ≈ 0.3003, past which no γ exists.
    """
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is outside (0, {SIGMA_REL_MAX:.4f}); pass a relative EMA "
            "length such as 0.05 or 0.10 (0 is no averaging, 1/sqrt(12) averages all of training)"
        )
    s = sigma_rel**-2
    # σ_rel² = (γ+1)/((γ+2)²(γ+3))  ⇔  γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²) = 0, EDM2 §3
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


class PowerEMA:
    """Power-function EMA profiles of a model's parameters, one per σ_rel (EDM2 §3), kept in
    tensors the caller owns (e.g. the parameters of EMA twins of the model, sharded like it, so
    torch's state-dict tools save and reshard them). `update` runs only torch._foreach ops and
    no host sync; keep the profiles in float32."""

    def __init__(self, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if len({f"{s:g}" for s in self.sigma_rels}) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels {self.sigma_rels} repeat a value; pass distinct ones")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)

    def update(
        self,
        step: int,
        profiles: Sequence[list[Tensor]],
        params: list[Tensor],
        keep: Tensor | None = None,
    ) -> None:
        """Fold the weights after optimizer update number ``step`` (1-based) into each profile
        (``profiles[k]`` for σ_rel k, tensor by tensor like ``params``). ``keep``: 0.0 on the
        device where the update was skipped, which leaves the profiles as they were."""
        if step < 1:
            raise ValueError(f"step={step} must be >= 1: the first optimizer update is step 1")
        with torch.no_grad():
            for gamma, profile in zip(self.gammas, profiles, strict=True):
                beta = (1.0 - 1.0 / step) ** (gamma + 1.0)  # β_γ(t) = (1 - 1/t)^(γ+1), EDM2 §3
                # ema ← β·ema + (1-β)·θ, EDM2 §3; lerp with weight 1 (step 1) returns θ exactly
                weight = 1.0 - beta if keep is None else keep * (1.0 - beta)
                weights = weight if keep is None else [weight] * len(profile)
                torch._foreach_lerp_(profile, params, weights)


@dataclass(frozen=True)
class Snapshot:
    """One EMA profile stored in a snapshot file."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float


def save_snapshot(
    folder: Path, step: int, sigma_rels: Sequence[float], tensors: dict[str, Tensor]
) -> Path:
    """Atomically write ``folder/ema-{step:08d}.safetensors`` with step and σ_rels as metadata;
    with FSDP2 shards, every rank calls it (checkpoint.write_safetensors)."""
    prefixes = {f"{float(s):g}/" for s in sigma_rels}
    stray = [k for k in tensors if k[: k.find("/") + 1] not in prefixes]
    if stray:
        raise ValueError(f"keys {stray[:5]} lack a '<sigma_rel>/' prefix from {list(sigma_rels)}")
    meta = {"step": str(step), "sigma_rels": json.dumps([float(s) for s in sigma_rels])}
    return write_safetensors(Path(folder) / f"ema-{step:08d}.safetensors", tensors, meta)


def load_snapshots(folder: Path) -> list[Snapshot]:
    """Every (file, profile) in ``folder``, sorted by step, from the headers alone."""
    snapshots = []
    for path in sorted(Path(folder).glob("ema-*.safetensors")):
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
            step, sigma_rels = int(meta["step"]), json.loads(meta["sigma_rels"])
            snapshots += [Snapshot(path, step, s, sigma_rel_to_gamma(s)) for s in sigma_rels]
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is not a readable EMA snapshot ({type(e).__name__}: {e}); delete it "
                "or replace it with a file written by save_snapshot"
            ) from e
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


def p_dot_p(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of power-function profiles p(τ) = (γ+1)τ^γ / t^(γ+1) on
    [0, t] (EDM2 App. C.2); numpy, broadcasting over its arguments."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    t_max = np.maximum(t_a, t_b)
    g_later = np.where(t_a <= t_b, g_b, g_a)
    # ⟨p_a,p_b⟩ = (γa+1)(γb+1)/(γa+γb+1) · t_min^(γa+γb+1) / (t_a^(γa+1) t_b^(γb+1))
    #           = (γa+1)(γb+1)/(γa+γb+1) · (t_min/t_max)^γ_later / t_max, EDM2 App. C.2
    scale = (g_a + 1) * (g_b + 1) / (g_a + g_b + 1)
    return scale * (np.minimum(t_a, t_b) / t_max) ** g_later / t_max


def solve_weights(
    t_i: ArrayLike, gamma_i: ArrayLike, t_target: float, gamma_target: float
) -> np.ndarray:
    """Weights x minimising ‖Σ x_i p_i - p_target‖² over [0, t_target] (EDM2 App. C.2).

    Solves the normal equations A x = b with np.linalg.lstsq (SVD, default rcond), which
    drops the near-null directions of the Gram matrix A when snapshots are nearly redundant.
    """
    t, g = np.asarray(t_i, dtype=np.float64), np.asarray(gamma_i, dtype=np.float64)
    gram = p_dot_p(t[:, None], g[:, None], t[None, :], g[None, :])  # A_ij = ⟨p_i, p_j⟩, App. C.2
    rhs = p_dot_p(t, g, t_target, gamma_target)  # b_i = ⟨p_i, p_target⟩, EDM2 App. C.2
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]  # x = argmin ‖A x - b‖, EDM2 App. C.2


def synthesize(
    folder: Path, sigma_rel: float, step: int | None = None
) -> tuple[dict[str, Tensor], dict]:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot's) from the
    snapshots in ``folder`` up to that step, accumulated in float64 one tensor at a time.

    Returns float32 tensors keyed by parameter name and {"snapshots", "weights", "gamma", "step"}.
    """
    snapshots = load_snapshots(folder)
    if not snapshots:
        raise FileNotFoundError(f"no ema-*.safetensors snapshots in {folder}; save some first")
    first, last = snapshots[0].step, snapshots[-1].step
    step = last if step is None else step
    if not first <= step <= last:
        raise ValueError(
            f"step={step} is outside the snapshots' steps {first}..{last} in {folder}; "
            "pass a step in that range (or None for the last)"
        )
    used = [s for s in snapshots if s.step <= step]
    if len(used) < 2:
        raise ValueError(
            f"only {len(used)} snapshot profile up to step {step} in {folder}; synthesis needs "
            "at least 2: pass a later step or save snapshots more often"
        )
    gamma = sigma_rel_to_gamma(sigma_rel)
    weights = solve_weights([s.step for s in used], [s.gamma for s in used], step, gamma)
    acc: dict[str, Tensor] = {}
    for snap, w in zip(used, weights.tolist(), strict=True):
        prefix = f"{snap.sigma_rel:g}/"
        with safe_open(snap.path, "pt") as f:
            keys = f.keys()
            names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
            if acc and set(names) != acc.keys():
                raise ValueError(f"{snap.path} ({prefix}) holds other parameters than earlier ones")
            for name in names:
                t = f.get_tensor(prefix + name).to(torch.float64)
                # θ̂_target ≈ Σ_i x_i θ̂_i, EDM2 App. C.2
                acc[name] = acc[name].add_(t, alpha=w) if name in acc else t.mul_(w)
    info = {"snapshots": len(used), "weights": weights.tolist(), "gamma": gamma, "step": step}
    return {name: acc.pop(name).float() for name in list(acc)}, info


def export_posthoc(
    run: Path, sigma_rel: float, out: Path, step: int | None = None
) -> tuple[Path, dict]:
    """Synthesise the EMA of length ``sigma_rel`` from RUN/ema and write it as a model folder
    (out/model.safetensors + model.json, and the run's config.yaml) that sample, evaluate and
    grow take; returns its weights file and the synthesis info."""
    params, info = synthesize(Path(run) / SNAPSHOT_DIR, sigma_rel, step)
    weights, meta = load_file(Path(run) / "model.safetensors"), read_meta(run)
    if missing := sorted(params.keys() - weights.keys()):
        raise ValueError(f"{run}/ema snapshots hold tensors its export lacks: {missing[:5]}")
    if info["step"] != meta.get("step"):
        meta.pop("compute", None)  # the cost recorded is the last step's
    meta |= {
        "step": info["step"],
        "ema": {"sigma_rel": sigma_rel, "posthoc": True, "snapshots": info["snapshots"]},
    }
    path = export_model(out, weights | params, meta, name="model")
    save_config(run_config(run), Path(out) / "config.yaml")
    return path, info
