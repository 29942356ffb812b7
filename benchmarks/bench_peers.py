"""greedygrow's UViT against peer pixel-space diffusion models, side by side in one process.

    pip install -e ".[peers]"                                   # diffusers, einops
    pip install --no-deps denoising-diffusion-pytorch==2.3.4    # lucidrains' UViT, no trainer deps
    python benchmarks/bench_peers.py [--dtype fp32|bf16|both] [--only NAME,...] [--compile]

One training step = forward + MSE + backward + AdamW on random data (batch 16 of 64×64 RGB),
the same for every model. For each (model, dtype) one JSON line: parameters, forward and
forward+backward FLOPs per image (torch.utils.flop_counter; SDPA on its math path so peer
attention is counted; our CPU attention op registers its own formula), images/s (batch / median
step), achieved FLOP/s (3 × forward FLOPs × images/s) and utilisation against a same-dtype
2048² matmul timed right before and right after that model's steps. Models alternate in one
process, so their ratios are measured side by side. `--compile`: our blocks regionally
(`UViT.compile_blocks`), each peer as a whole (`torch.compile(model)`).

Peers (docs/performance.md, "Against peers"): diffusers' UNet2DConditionModel laid out like
DeepFloyd IF stage I, scaled to 10M / 40M parameters, cross-attending to 16 text tokens of 384
channels; lucidrains' simple-diffusion UViT at library defaults (dim 32 / 72). lucidrains'
module file is loaded directly: the package __init__ imports its trainer's dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from greedygrow.allocator import keep_freed_memory
from greedygrow.model import CoreConfig, UViT, core_preset, shell_preset

TEXT_TOKENS, TEXT_DIM = 16, 384
Inputs = dict[str, torch.Tensor]


def _ours(core: CoreConfig, res: int) -> UViT:
    return UViT(core, shell_preset("grown", res, "cpu"))


def _ours_inputs(b: int, res: int, gen: torch.Generator) -> Inputs:
    return {
        "z": torch.randn(b, 3, res, res, generator=gen),
        "logsnr": torch.rand(b, generator=gen) * 20 - 10,
        "tokens": torch.randn(b, TEXT_TOKENS, TEXT_DIM, generator=gen),
        "mask": torch.ones(b, TEXT_TOKENS, dtype=torch.bool),
        "pooled": torch.randn(b, TEXT_DIM, generator=gen),
    }


def _ours_call(m: Any, x: Inputs) -> torch.Tensor:
    return m(x["z"], x["logsnr"], x["tokens"], x["mask"], x["pooled"])


def _if_unet(channels: tuple[int, ...], head_dim: int, res: int) -> torch.nn.Module:
    """UNet2DConditionModel in DeepFloyd IF stage I's layout (scale-shift time conditioning,
    simple cross-attention blocks below the first level, text pooled into the time embedding,
    eps + learned-variance output), scaled down."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=res,
        in_channels=3,
        out_channels=6,
        layers_per_block=3,
        block_out_channels=channels,
        down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
        cross_attention_dim=channels[-1],
        encoder_hid_dim=TEXT_DIM,
        encoder_hid_dim_type="text_proj",
        attention_head_dim=head_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=max(1, channels[-1] // 64),
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )


def _if_inputs(b: int, res: int, gen: torch.Generator) -> Inputs:
    return {
        "x": torch.randn(b, 3, res, res, generator=gen),
        "t": torch.randint(0, 1000, (b,), generator=gen),
        "text": torch.randn(b, TEXT_TOKENS, TEXT_DIM, generator=gen),
    }


def _if_call(m: Any, x: Inputs) -> torch.Tensor:
    return m(x["x"], x["t"], encoder_hidden_states=x["text"]).sample


def _simple_diffusion_uvit(dim: int) -> torch.nn.Module:
    try:
        dist = importlib.metadata.distribution("denoising-diffusion-pytorch")
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit(
            "denoising-diffusion-pytorch is not installed: "
            "pip install --no-deps denoising-diffusion-pytorch==2.3.4"
        ) from e
    path = dist.locate_file("denoising_diffusion_pytorch/simple_diffusion.py")
    spec = importlib.util.spec_from_file_location("_simple_diffusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UViT(dim=dim)


def _uvit_inputs(b: int, res: int, gen: torch.Generator) -> Inputs:
    return {"x": torch.randn(b, 3, res, res, generator=gen), "t": torch.rand(b, generator=gen)}


def _uvit_call(m: Any, x: Inputs) -> torch.Tensor:
    return m(x["x"], x["t"])


def _core(width: int, depth: int, heads: int) -> CoreConfig:
    return CoreConfig(width, depth, heads, text_dim=TEXT_DIM, text_len=TEXT_TOKENS)


MODELS: dict[str, tuple[Callable[[int], Any], Callable, Callable]] = {
    "greedygrow-cpu-small": (
        lambda r: _ours(core_preset("cpu-small", text_dim=TEXT_DIM, text_len=TEXT_TOKENS), r),
        _ours_inputs,
        _ours_call,
    ),
    # parameter counts matched to the peers': 9.3M (256 × 5) and 38.6M (384 × 10), heads of 64
    "greedygrow-10m": (lambda r: _ours(_core(256, 5, 4), r), _ours_inputs, _ours_call),
    "greedygrow-40m": (lambda r: _ours(_core(384, 10, 6), r), _ours_inputs, _ours_call),
    "if-unet-10m": (lambda r: _if_unet((32, 64, 96, 128), 32, r), _if_inputs, _if_call),
    "if-unet-40m": (lambda r: _if_unet((64, 128, 192, 256), 64, r), _if_inputs, _if_call),
    "uvit-10m": (lambda r: _simple_diffusion_uvit(32), _uvit_inputs, _uvit_call),
    "uvit-40m": (lambda r: _simple_diffusion_uvit(72), _uvit_inputs, _uvit_call),
}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 12) -> float:
    """Median GFLOP/s of an n×n matmul in `dtype` (2n³ FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / statistics.median(times) / 1e9


def count_flops(model: Any, x: Inputs, call: Callable) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of the batch `x`, attention on SDPA's math path."""
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            call(model, x)
        with FlopCounterMode(display=False) as both:
            call(model, x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def bench(name: str, dtype: str, args: argparse.Namespace) -> dict:
    """Time `name`'s training step in `dtype`; one result row."""
    build, make_inputs, call = MODELS[name]
    torch.manual_seed(0)
    model = build(args.res).train()
    params = sum(p.numel() for p in model.parameters())
    one = make_inputs(1, args.res, torch.Generator().manual_seed(0))
    fwd, fwd_bwd = count_flops(model, one, call)
    x = make_inputs(args.batch, args.res, torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward: Any = model
    if args.compile and isinstance(model, UViT):
        model.compile_blocks()
    elif args.compile:
        forward = torch.compile(model)
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )

    def step() -> None:
        with amp:
            out = call(forward, x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    before = matmul_gflops(mm_dtype)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    matmul = statistics.median([before, matmul_gflops(mm_dtype)])
    images_per_s = args.batch / statistics.median(times)
    achieved = 3 * fwd * images_per_s / 1e9
    return {
        "name": name,
        "dtype": dtype,
        "params_m": round(params / 1e6, 2),
        "fwd_gflops_per_image": round(fwd / 1e9, 3),
        "fwd_bwd_gflops_per_image": round(fwd_bwd / 1e9, 3),
        "images_per_s": round(images_per_s, 2),
        "achieved_gflops": round(achieved, 1),
        "matmul_gflops": round(matmul, 1),
        "util_vs_matmul": round(achieved / matmul, 3),
        "compile": args.compile,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(MODELS), help="comma-separated names")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    args = p.parse_args()
    keep_freed_memory()  # as the greedygrow command does; the peers get the same allocator
    names = args.only.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    for dtype in dtypes:
        for name in names:
            print(json.dumps(bench(name, dtype, args)), flush=True)
            torch._dynamo.reset()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)


if __name__ == "__main__":
    main()
