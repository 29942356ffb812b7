"""Samplers for v-prediction models: ancestral, DDIM and DPM-Solver++(2M), with guidance.

Every sampler calls the model `steps` times, at log-SNRs evenly spaced from the schedule's noisy
end λ(1) to its clean end λ(0) = λ_max, both included (`logsnr_grid`), steps between the calls,
and returns the x̂ of the last call, at λ_max, clamped to [−1, 1]. Even spacing in λ gives detail
at every scale the same accuracy, coarse structure (low λ at high resolution) as well as fine
texture (high λ); ending on a call at λ_max keeps fine detail that a last call at high noise
averages away (docs/method.md, Sampling).

Classifier-free guidance (Ho & Salimans 2022) is applied to v̂: out = out_u + w (out_c − out_u).
Because x̂ and ε̂ are linear in v̂ at fixed (z, λ), this is the same as guiding x̂ or ε̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from greedygrow.diffusion import Schedule, alpha_sigma, eps_from_v, x_from_v

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(z [N, ...], logsnr [N], drop [N] bool: True → unconditional) -> v̂ [N, ...]."""

SAMPLERS = ("ddim", "ancestral", "dpmpp2m")
DEFAULT_STEPS = {"ddim": 50, "ancestral": 50, "dpmpp2m": 25}
"""Steps of `greedygrow sample` and `evaluate` per sampler: 25 for DPM-Solver++(2M), whose
alignment scores at 25 steps match those at 50 (docs/evaluation.md); 50 for the first-order
samplers."""


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16 or
    AMX), so that bf16 autocast speeds sampling up there instead of emulating bf16 in fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def uvit_denoiser(
    model: nn.Module, text_tokens: Tensor, text_mask: Tensor, text_pooled: Tensor
) -> Denoiser:
    """Wrap a UViT and its text as a Denoiser.

    The text batch b is one prompt for all images (b = 1) or one per image; it is tiled along
    the batch to whatever N the sampler asks for (N = B, or 2B for [cond; uncond]), so N must
    be a multiple of b. The model's mode is left alone: call `model.eval()` (no dropout) first.
    """
    b = text_tokens.shape[0]
    if not text_mask.shape[0] == text_pooled.shape[0] == b:
        raise ValueError(
            f"uvit_denoiser: text_tokens, text_mask and text_pooled have batch sizes {b}, "
            f"{text_mask.shape[0]}, {text_pooled.shape[0]}; give one text per prompt"
        )
    text = (text_tokens, text_mask, text_pooled)
    cache: dict[tuple[int, torch.device], tuple[Tensor, ...]] = {}

    def denoise(z: Tensor, logsnr: Tensor, drop: Tensor) -> Tensor:
        n = z.shape[0]
        if n % b:
            raise ValueError(
                f"uvit_denoiser: a batch of {n} images cannot share {b} prompts; pass one "
                "prompt, or one per image"
            )
        key = (n, z.device)
        if key not in cache:  # the text tiled n / b times along the batch
            cache[key] = tuple(torch.cat([x.to(z.device)] * (n // b)) for x in text)
        tokens, mask, pooled = cache[key]
        return model(z, logsnr, tokens, mask, pooled, drop_text=drop)

    return denoise


def _check(
    shape: tuple[int, ...],
    sampler: str,
    steps: int,
    seeds: Sequence[int] | None,
    guidance_interval: tuple[float, float] | None,
) -> list[int]:
    """Refuse arguments `sample` cannot use; returns one seed per image."""
    if len(shape) < 2:
        raise ValueError(f"sample: shape {shape} must be [B, ...] with at least one image dim")
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: sampler={sampler!r}; choose one of {SAMPLERS}")
    if int(steps) < 1:
        raise ValueError(f"sample: steps={steps} must be at least 1")
    seeds = list(range(shape[0])) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != shape[0]:
        raise ValueError(f"sample: {len(seeds)} seeds for a batch of {shape[0]}; give one each")
    if guidance_interval is not None and not guidance_interval[0] <= guidance_interval[1]:
        raise ValueError(f"sample: guidance_interval={guidance_interval} must be (lo, hi), lo<=hi")
    return seeds


def guided(
    denoise: Denoiser,
    w: float,
    interval: tuple[float, float] | None,
    device: torch.device,
    autocast: bool,
) -> Callable[[Tensor, float], Tensor]:
    """v̂(z, λ) in fp32, with classifier-free guidance of weight w where λ is in `interval`."""

    def v_hat(z: Tensor, lam: float) -> Tensor:
        n = z.shape[0]
        logsnr = torch.full((n,), lam, device=device, dtype=torch.float32)
        guided = w != 1.0 and (interval is None or interval[0] <= lam <= interval[1])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if not guided:
                return denoise(z, logsnr, torch.zeros(n, dtype=torch.bool, device=device)).float()
            drop = torch.arange(2 * n, device=device) >= n  # [cond; uncond] in one forward
            out = denoise(torch.cat([z, z]), torch.cat([logsnr, logsnr]), drop).float()
        out_c, out_u = out[:n], out[n:]
        return out_u + w * (out_c - out_u)  # CFG: out_u + w (out_c − out_u) (Ho & Salimans 2022)

    return v_hat


def _noise(generators: Sequence[torch.Generator], shape: Sequence[int], device) -> Tensor:
    """One draw per image from its own CPU generator, so image i never depends on the batch."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def logsnr_grid(schedule: Schedule, steps: int) -> list[float]:
    """The log-SNRs of a sampler's `steps` model calls, noisy to clean: evenly spaced from λ(1)
    to λ(0) = λ_max, both included (a single call is at λ(1))."""
    lam_noise, lam_clean = schedule.logsnr(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
    # λ_i = λ(1) + i (λ(0) − λ(1)) / (steps − 1)  (DPM-Solver's logSNR spacing, Lu et al. 2022)
    return torch.linspace(lam_noise, lam_clean, int(steps), dtype=torch.float64).tolist()


@torch.inference_mode()
def sample(
    denoise: Denoiser,
    shape: Sequence[int],
    schedule: Schedule,
    steps: int = 50,
    sampler: str = "ddim",
    guidance: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    autocast: bool = False,
    progress: bool = False,
) -> Tensor:
    """Generate images x [B, ...] in [−1, 1] from a v-prediction Denoiser.

    sampler: "ddim" (deterministic, η = 0), "ancestral" (DDPM posterior) or "dpmpp2m"
    (DPM-Solver++(2M)). guidance: CFG weight w (1 → no unconditional pass at all).
    guidance_interval: (λ_lo, λ_hi); guide only at steps whose log-SNR lies inside it.
    seeds: one per image (default 0..B−1); image i depends only on seeds[i].
    autocast: run the denoiser under bf16 autocast (the sampler's own arithmetic stays fp32).
    """
    shape = tuple(int(s) for s in shape)
    seeds = _check(shape, sampler, steps, seeds, guidance_interval)
    device = torch.device(device)
    v_hat = guided(denoise, float(guidance), guidance_interval, device, autocast)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    z = _noise(generators, shape[1:], device)
    lams = logsnr_grid(schedule, steps)
    x_prev: Tensor | None = None
    h_prev = 0.0
    for i, lam_t in enumerate(tqdm(lams, disable=not progress, desc=f"sampling ({sampler})")):
        lt = torch.tensor(lam_t, dtype=torch.float32, device=device)
        v = v_hat(z, lam_t)
        x = x_from_v(z, v, lt)  # x̂ = α_t z − σ_t v̂  (Salimans & Ho 2022)
        if i == len(lams) - 1:
            break  # the last call is at λ_max: its x̂ is the sample
        lam_s = lams[i + 1]
        a_t, s_t = (float(c) for c in alpha_sigma(torch.tensor(lam_t, dtype=torch.float64)))
        a_s, s_s = (float(c) for c in alpha_sigma(torch.tensor(lam_s, dtype=torch.float64)))
        if sampler == "ddim":
            # z_s = α_s x̂ + σ_s ε̂, ε̂ = σ_t z + α_t v̂  (DDIM, η = 0; Song et al. 2021, eq. 12)
            z = a_s * x + s_s * eps_from_v(z, v, lt)
        elif sampler == "ancestral":
            # z_s ~ q(z_s | z_t, x = x̂), the DDPM posterior in λ (Kingma et al. 2021, App. A):
            # c = 1 − e^{λ_t − λ_s} = σ²_{t|s} / σ_t²
            c = -math.expm1(lam_t - lam_s)
            # mean = (α_t σ_s² / (α_s σ_t²)) z_t + α_s c x̂
            mean = (a_t * s_s**2 / (a_s * s_t**2)) * z + (a_s * c) * x
            # z_s = mean + σ_s √c ε
            z = mean + (s_s * math.sqrt(c)) * _noise(generators, shape[1:], device)
        else:
            # DPM-Solver++(2M), data prediction (Lu et al. 2022, DPM-Solver++, Alg. 2), in
            # half-log-SNR steps h = (λ_s − λ_t)/2 with r = h_prev / h:
            h = 0.5 * (lam_s - lam_t)
            # D = (1 + 1/(2r)) x̂_t − x̂_prev / (2r); D = x̂_t on the first step
            d = x if x_prev is None else x + (x - x_prev) * (h / (2.0 * h_prev))
            # z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) D
            z = (s_s / s_t) * z - (a_s * math.expm1(-h)) * d
            x_prev, h_prev = x, h
    return x.clamp(-1.0, 1.0)
