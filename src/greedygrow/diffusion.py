"""Continuous-time variance-preserving diffusion: log-SNR schedules, noising, v-prediction, losses.

Conventions (docs/method.md, Diffusion): t in [0, 1], t = 0 clean, t = 1 noise; λ = log(α²/σ²)
is the log signal-to-noise ratio; z_t = α x + σ ε with α² = sigmoid(λ), σ² = sigmoid(−λ), so
α² + σ² = 1.
Images live in [−1, 1]. The network predicts v = α ε − σ x (Salimans & Ho 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from greedygrow.fields import DictSpec, check_positive_ints

SCHEDULE_KINDS = ("cosine", "shifted", "interpolated")
WEIGHTINGS = ("v_mse", "sigmoid", "min_snr")
# Sigmoid-weighting bias b in sigmoid(b − λ). Kingma & Gao (2023) treat b as a knob; negative
# values put more weight on noisy levels, which pixel-space models at high resolution need
# (Hoogeboom et al. 2024, "Simpler Diffusion"). −3 is our default; tune it per data set.
SIGMOID_BIAS = -3.0
MIN_SNR_GAMMA = 5.0  # γ of min-SNR weighting (Hang et al. 2023, their default)
MULTISCALE_MIN_RESOLUTION = 32  # smallest scale of the multiscale loss (simple diffusion)
INTERPOLATE_FROM = 512  # schedule_for picks the interpolated schedule from this resolution up

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Schedule(DictSpec):
    """A log-SNR schedule λ(t); `kind` selects cosine, resolution-shifted or interpolated.

    Every kind is clamped to [logsnr_min, logsnr_max]; "cosine" ignores `resolution`.
    """

    kind: str = "cosine"
    resolution: int = 64
    base_resolution: int = 64
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    interp_lo: int = 32
    interp_hi: int = 256

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"Schedule.kind={self.kind!r}: choose one of {SCHEDULE_KINDS}")
        check_positive_ints(self, "Schedule")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"Schedule: logsnr_min={self.logsnr_min} must be below logsnr_max={self.logsnr_max}"
            )

    def logsnr(self, t: Tensor | float) -> Tensor:
        """λ(t) for t in [0, 1] (0 clean → logsnr_max, 1 noise); computed in float64."""
        t = torch.as_tensor(t)
        out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        t = t.to(torch.float64)
        if self.kind == "cosine":
            lam = self._cosine(t)
        elif self.kind == "shifted":
            lam = self._shifted(t, self.base_resolution)
        else:
            # λ(t) = t λ_shift(R_lo)(t) + (1 − t) λ_shift(R_hi)(t)  (simple diffusion §3.1,
            # Hoogeboom et al. 2023): the strong shift (R_lo = 32) rules at high noise, where
            # global structure forms; the mild one (R_hi = 256) at low noise, so fine detail is
            # not pushed to the very last steps.
            lam = t * self._shifted(t, self.interp_lo) + (1 - t) * self._shifted(t, self.interp_hi)
        return lam.to(out_dtype)

    def dlogsnr_dt(self, t: Tensor | float) -> Tensor:
        """dλ/dt (≤ 0) at t in [0, 1], float64, by autograd through `logsnr` (so it is exact for
        every kind, and 0 where λ is clamped)."""
        with torch.enable_grad():
            t = torch.as_tensor(t, dtype=torch.float64).clone().requires_grad_(True)
            return torch.autograd.grad(self.logsnr(t).sum(), t)[0]

    def _cosine(self, t: Tensor) -> Tensor:
        # λ(t) = −2 log tan(a + t (b − a)), a = atan(e^{−λmax/2}), b = atan(e^{−λmin/2})
        # (docs/method.md, Diffusion; Kingma et al. 2021)
        a = math.atan(math.exp(-0.5 * self.logsnr_max))
        b = math.atan(math.exp(-0.5 * self.logsnr_min))
        return -2.0 * torch.log(torch.tan(a + t * (b - a)))

    def _shifted(self, t: Tensor, reference: int) -> Tensor:
        # λ_R(t) = clamp(λ(t) + 2 log(reference / R))  (simple diffusion eq. 4, Hoogeboom 2023)
        lam = self._cosine(t) + 2.0 * math.log(reference / self.resolution)
        return lam.clamp(self.logsnr_min, self.logsnr_max)


def schedule_for(resolution: int, kind: str | None = None) -> Schedule:
    """The default schedule for a training resolution, or the given `kind` at that resolution.

    Default: cosine at the 64 px base (the Shallow-UViT of phase 1), the shifted cosine below
    512 px (2 log(64/R) shifts towards noise as pixels get redundant), and the interpolated
    schedule from 512 px up, as simple diffusion does for its 512 and 1024 px models.
    """
    if kind is None and resolution == Schedule.base_resolution:
        kind = "cosine"
    elif kind is None:
        kind = "interpolated" if resolution >= INTERPOLATE_FROM else "shifted"
    return Schedule(kind=kind, resolution=int(resolution))


def _per_sample(a: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample [B] (or scalar) tensor to broadcast against `like` [B, ...]."""
    if a.ndim == 0:
        return a
    if a.ndim != 1 or a.shape[0] != like.shape[0]:
        raise ValueError(
            f"logsnr has shape {tuple(a.shape)}; expected [] or [{like.shape[0]}] to match "
            f"the batch of a tensor of shape {tuple(like.shape)}"
        )
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) with α² = sigmoid(λ), σ² = sigmoid(−λ)  (Kingma et al. 2021)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def add_noise(x: Tensor, noise: Tensor, logsnr: Tensor) -> Tensor:
    """z = α x + σ ε  (Kingma et al. 2021)."""
    a, s = alpha_sigma(_per_sample(logsnr, x))
    return a * x + s * noise


def v_target(x: Tensor, noise: Tensor, logsnr: Tensor) -> Tensor:
    """v = α ε − σ x  (Salimans & Ho 2022, eq. in §4)."""
    a, s = alpha_sigma(_per_sample(logsnr, x))
    return a * noise - s * x


def x_from_v(z: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """x̂ = α z − σ v̂  (Salimans & Ho 2022)."""
    a, s = alpha_sigma(_per_sample(logsnr, z))
    return a * z - s * v


def eps_from_v(z: Tensor, v: Tensor, logsnr: Tensor) -> Tensor:
    """ε̂ = σ z + α v̂  (Salimans & Ho 2022)."""
    a, s = alpha_sigma(_per_sample(logsnr, z))
    return s * z + a * v


def _mse(residual: Tensor, multiscale: bool) -> Tensor:
    """Per-sample mean squared residual; multiscale averages it over 2× average-pooled copies
    from R down to 32 px (simple diffusion §3.3; we average the scales rather than sum them so
    the loss magnitude does not grow with R)."""
    dims = tuple(range(1, residual.ndim))
    terms = [residual.square().mean(dims)]
    if multiscale:
        if residual.ndim != 4:
            raise ValueError(f"multiscale loss needs [B,C,H,W] images, got {residual.shape}")
        while all(s % 2 == 0 and s // 2 >= MULTISCALE_MIN_RESOLUTION for s in residual.shape[-2:]):
            residual = F.avg_pool2d(residual, 2)  # D_s: average pooling to the next scale
            terms.append(residual.square().mean(dims))
    return torch.stack(terms).mean(0)


def training_loss(
    denoise: DenoiseFn,
    x: Tensor,
    schedule: Schedule,
    t: Tensor,
    noise: Tensor,
    weighting: str = "v_mse",
    multiscale: bool = False,
    sigmoid_bias: float = SIGMOID_BIAS,
    min_snr_gamma: float = MIN_SNR_GAMMA,
) -> Tensor:
    """Per-sample diffusion loss [B] for clean images x [B, ...] noised with `noise` (x's
    shape) at times t [B]; `denoise(z, logsnr) -> v̂`.

    weighting: "v_mse" (plain v-MSE), "sigmoid" (ε-MSE weighted by sigmoid(sigmoid_bias − λ)
    per unit of λ) or "min_snr" (min(SNR, min_snr_gamma)).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"training_loss: weighting={weighting!r}; choose one of {WEIGHTINGS}")
    if t.shape != x.shape[:1] or noise.shape != x.shape:
        raise ValueError(
            f"training_loss: t {list(t.shape)} and noise {list(noise.shape)} must "
            f"match the batch of x {list(x.shape)}"
        )
    noise = noise.to(x.device)
    logsnr = schedule.logsnr(t).to(device=x.device, dtype=torch.float32)
    z = add_noise(x, noise, logsnr)
    v_hat = denoise(z, logsnr)
    if v_hat.shape != x.shape:
        raise ValueError(f"denoise returned shape {tuple(v_hat.shape)}, expected {x.shape}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # loss in ≥ fp32, even from bf16 v̂
    v_err = v_hat.to(dtype) - v_target(x, noise, logsnr).to(dtype)
    if weighting == "sigmoid":
        # ε̂ − ε = α (v̂ − v), since ε = σ z + α v  (Salimans & Ho 2022)
        eps_err = _per_sample(alpha_sigma(logsnr)[0], v_err) * v_err
        # L = ½ w(λ) (−dλ/dt) ‖ε̂ − ε‖², w(λ) = sigmoid(b − λ)  (Kingma & Gao 2023, eq. 7);
        # the −dλ/dt factor makes the weighting a density in λ, whatever the schedule
        slope = schedule.dlogsnr_dt(t).to(device=x.device, dtype=torch.float32)
        return 0.5 * torch.sigmoid(sigmoid_bias - logsnr) * -slope * _mse(eps_err, multiscale)
    mse = _mse(v_err, multiscale)
    if weighting == "min_snr":
        # L = min(SNR, γ) ‖x̂ − x‖² = min(SNR, γ)/(SNR + 1) ‖v̂ − v‖²  (Hang et al. 2023, v-pred)
        snr = logsnr.exp()
        return snr.clamp(max=min_snr_gamma) / (snr + 1) * mse
    return mse  # L = ‖v̂ − v‖²  (Salimans & Ho 2022)
