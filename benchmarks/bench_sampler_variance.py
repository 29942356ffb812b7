"""Sample std / true std of every sampler under the exact denoiser of Gaussian pixels.

Data x ~ N(0, s²) per pixel (s = 0.25 by default), whose exact v-prediction denoiser is known in
closed form (x̂ = α s² z / (α² s² + σ²)); a sampler that stops short of the clean end, or steps
too coarsely, returns samples with less than the true std. One row per resolution's default
schedule (`schedule_for`) and step count. This is the table of docs/method.md, Sampling.

`--before PATH` adds the same table for another copy of the sampling module, e.g. an older one
written out with `git show REV:src/greedygrow/sampling.py > /tmp/old_sampling.py`.

Run: `python benchmarks/bench_sampler_variance.py [--std 0.25] [--before PATH]`.
"""

from __future__ import annotations

import argparse
import importlib.util
from types import ModuleType

from torch import Tensor

from greedygrow import sampling
from greedygrow.diffusion import alpha_sigma, schedule_for

RESOLUTIONS = (64, 256, 512)
STEPS = (25, 50)
SHAPE = (8, 4096)  # 32 768 pixels: the std is measured to about 0.4 %


def gaussian_denoiser(std: float):
    """The exact v̂ for x ~ N(0, std²): x̂ = α s² z / (α² s² + σ²), v̂ = (α z − x̂) / σ."""

    def denoise(z: Tensor, logsnr: Tensor, drop: Tensor) -> Tensor:
        a, s = alpha_sigma(logsnr.double().view(-1, *[1] * (z.ndim - 1)))
        zz = z.double()
        x_hat = a * std**2 / (a**2 * std**2 + s**2) * zz  # E[x | z] for Gaussian x
        return ((a * zz - x_hat) / s).to(z.dtype)  # v̂ = (α z − x̂) / σ

    return denoise


def load(path: str) -> ModuleType:
    """A sampling module from a file."""
    spec = importlib.util.spec_from_file_location("sampling_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(module: ModuleType, std: float, title: str) -> None:
    """Print sample std / std for each sampler of `module`, resolution and step count."""
    denoise = gaussian_denoiser(std)
    print(f"\n{title} (s = {std})\n| px | steps | " + " | ".join(module.SAMPLERS) + " |")
    print("|---:|---:|" + "---:|" * len(module.SAMPLERS))
    for resolution in RESOLUTIONS:
        for steps in STEPS:
            ratios = [
                module.sample(denoise, SHAPE, schedule_for(resolution), steps, name).std().item()
                / std
                for name in module.SAMPLERS
            ]
            print(f"| {resolution} | {steps} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--std", type=float, default=0.25, help="s of the Gaussian pixels")
    parser.add_argument("--before", help="another sampling.py to measure alongside")
    args = parser.parse_args()
    if args.before:
        table(load(args.before), args.std, f"before: {args.before}")
    table(sampling, args.std, "greedygrow.sampling")


if __name__ == "__main__":
    main()
