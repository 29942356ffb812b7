"""Sampling cost: seconds per image for each sampler, and images/s of guided sampling in batches.

Randomly initialised UViTs wrapped by `uvit_denoiser` with random text, as `greedygrow sample`
and `greedygrow evaluate` run trained ones. Guidance w ≠ 1 doubles the batch of every forward
([cond; uncond]); a guidance interval skips the unconditional half outside it. One warm-up call
per configuration is not counted.

- samplers: every sampler, with and without guidance, for `--core` at `--resolution`;
- throughput: images/s of DPM-Solver++(2M), 25 steps, guidance 3, batch `--throughput-batch`,
  fp32 and bf16 autocast, for the demo-size model (cpu-mini core grown to 64 px) and the
  cpu-small core at 32 px (shallow shell) and grown to 128 px. *per CPU-s* divides by the
  process's CPU time instead of wall time, the steadier figure on a shared machine.

Run: `python benchmarks/bench_sampling.py [--part samplers|throughput|all] [--quick] ...`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from greedygrow.allocator import keep_freed_memory
from greedygrow.diffusion import schedule_for
from greedygrow.model import UViT, core_preset, shell_preset
from greedygrow.sampling import SAMPLERS, Denoiser, sample, uvit_denoiser

THROUGHPUT_MODELS = (
    ("cpu-mini", "grown", 64),
    ("cpu-small", "shallow", 32),
    ("cpu-small", "grown", 128),
)


def random_denoiser(core_name: str, kind: str, resolution: int, batch: int) -> Denoiser:
    """A random UViT (`core_name` core, `cpu` shell of `kind`) with `batch` random texts."""
    torch.manual_seed(0)
    core = core_preset(core_name)
    model = UViT(core, shell_preset(kind, resolution, "cpu", grid=core.grid)).eval()
    tokens = torch.randn(batch, core.text_len, core.text_dim)
    mask = torch.ones(batch, core.text_len, dtype=torch.bool)
    return uvit_denoiser(model, tokens, mask, torch.randn(batch, core.text_dim))


def timed(*args, **kw) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one `sample(*args, **kw)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    sample(*args, **kw)
    return time.perf_counter() - wall, time.process_time() - cpu


def samplers(args: argparse.Namespace) -> None:
    """Seconds per image for each sampler at --core, --resolution, --steps, --batch."""
    kind = "shallow" if args.resolution <= 64 else "grown"
    denoise = random_denoiser(args.core, kind, args.resolution, 1)
    shape = (args.batch, 3, args.resolution, args.resolution)
    schedule = schedule_for(args.resolution)
    print(
        f"# samplers: {args.core} core, {kind} shell, {args.resolution} px, batch {args.batch}, "
        f"{args.steps} steps, {'bf16' if args.bf16 else 'fp32'}"
    )
    sample(denoise, shape, schedule, steps=1, autocast=args.bf16)  # warm-up
    cases = [(s, 1.0, None) for s in SAMPLERS] + [
        ("dpmpp2m", 3.0, None),
        ("dpmpp2m", 3.0, (-5.0, 5.0)),
    ]
    for sampler, w, interval in cases:
        wall, _ = timed(
            denoise, shape, schedule, args.steps, sampler, w, interval, autocast=args.bf16
        )
        per_image = wall / args.batch
        row = {"sampler": sampler, "guidance": w, "interval": interval, "s_per_image": per_image}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{sampler:>10}  w={w:<4} interval={interval!s:<12} {per_image:8.3f} s/image")


def throughput(args: argparse.Namespace) -> None:
    """Images/s of guided DPM-Solver++(2M) sampling in one batch, fp32 and bf16."""
    b, steps = args.throughput_batch, args.throughput_steps
    print(f"\n# throughput: dpmpp2m, {steps} steps, guidance 3 ([cond; uncond]), batch {b}")
    if not args.json:
        print("| core | shell | px | dtype | s/batch | images/s | images/CPU-s |")
        print("|---|---|---:|---|---:|---:|---:|")
    for core, kind, resolution in THROUGHPUT_MODELS:
        denoise = random_denoiser(core, kind, resolution, b)
        shape, schedule = (b, 3, resolution, resolution), schedule_for(resolution)
        for bf16 in (False, True):
            sample(denoise, shape, schedule, 1, "dpmpp2m", 3.0, autocast=bf16)  # warm-up
            wall, cpu = timed(denoise, shape, schedule, steps, "dpmpp2m", 3.0, autocast=bf16)
            dtype = "bf16" if bf16 else "fp32"
            row = {"core": core, "shell": kind, "resolution": resolution, "dtype": dtype}
            row |= {"s_per_batch": wall, "images_per_s": b / wall, "images_per_cpu_s": b / cpu}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"| {core} | {kind} | {resolution} | {dtype} | {wall:.1f} | "
                    f"{b / wall:.2f} | {b / cpu:.2f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("samplers", "throughput", "all"), default="all")
    parser.add_argument("--core", default="cpu-tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (samplers part)")
    parser.add_argument("--throughput-batch", type=int, default=64)
    parser.add_argument("--throughput-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny batches, 2 steps")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.throughput_steps, args.throughput_batch = 2, 2, 2, 2
    keep_freed_memory()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}, "
        f"{platform.processor() or platform.platform()}"
    )
    if args.part in ("samplers", "all"):
        samplers(args)
    if args.part in ("throughput", "all"):
        throughput(args)


if __name__ == "__main__":
    main()
