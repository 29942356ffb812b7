"""Sampling cost: seconds per image for each sampler, with and without guidance.

A randomly initialised UViT (core preset `cpu-tiny` by default, shallow `cpu` shell) wrapped
by `uvit_denoiser` with random text, as `greedygrow sample` would run a trained one. Guidance
w ≠ 1 doubles the batch of every forward ([cond; uncond]); a guidance interval skips the
unconditional half outside it. One warm-up call is not counted.
Run: `python benchmarks/bench_sampling.py [--resolution R] [--steps N] [--batch B] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from greedygrow.diffusion import schedule_for
from greedygrow.model import UViT, core_preset, shell_preset
from greedygrow.sampling import SAMPLERS, sample, uvit_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", default="cpu-tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="10 steps, batch 2 (smoke test)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch = 10, 2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    core = core_preset(args.core)
    kind = "shallow" if args.resolution <= 64 else "grown"
    model = UViT(core, shell_preset(kind, args.resolution, "cpu", grid=core.grid)).eval()
    tokens = torch.randn(1, core.text_len, core.text_dim)
    mask = torch.ones(1, core.text_len, dtype=torch.bool)
    denoise = uvit_denoiser(model, tokens, mask, torch.randn(1, core.text_dim))
    shape = (args.batch, 3, args.resolution, args.resolution)
    schedule = schedule_for(args.resolution)
    print(
        f"# {args.core} core, {kind} shell, {args.resolution} px, batch {args.batch}, "
        f"{args.steps} steps, {'bf16' if args.bf16 else 'fp32'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}"
    )
    sample(denoise, shape, schedule, steps=1, autocast=args.bf16)  # warm-up
    cases = [(s, 1.0, None) for s in SAMPLERS] + [
        ("dpmpp2m", 3.0, None),
        ("dpmpp2m", 3.0, (-5.0, 5.0)),
    ]
    for sampler, w, interval in cases:
        start = time.perf_counter()
        sample(denoise, shape, schedule, args.steps, sampler, w, interval, autocast=args.bf16)
        per_image = (time.perf_counter() - start) / args.batch
        row = {"sampler": sampler, "guidance": w, "interval": interval, "s_per_image": per_image}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{sampler:>10}  w={w:<4} interval={interval!s:<12} {per_image:8.3f} s/image")


if __name__ == "__main__":
    main()
