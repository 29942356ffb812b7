"""Training-step speed on one GPU: images/s, MFU against the chip's bf16 peak, peak memory.

    python benchmarks/bench_gpu.py [--peak-tflops 989] [--budget-s 480] [--device cuda]

For a cpu preset (cpu-small in the cpu shells) and paper-0.5b (in the paper shells) at 64, 256
and 512 px, in bf16 autocast, with the blocks compiled (`model.compile`) and eager: one JSON line
per configuration. A step is forward + v-MSE + backward + fused AdamW on random data, timed with
CUDA events after warm-up. MFU = 3 × forward FLOPs per image (matrix products, counted by the
layers) × images/s ÷ the peak (989 TFLOP/s: H100/H200 dense bf16). Runs until `--budget-s`
is spent, so it fits a fixed device lease; `--device cpu` runs it on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from greedygrow.model import UViT, core_preset, shell_preset

CONFIGS = [  # (core, shell family, batch per resolution)
    ("cpu-small", "cpu", {64: 256, 256: 32, 512: 8}),
    ("paper-0.5b", "paper", {64: 128, 256: 32, 512: 8}),
]


def step_time(model: UViT, batch: int, device: torch.device, steps: int) -> float:
    """Median seconds of a training step of `model` at `batch` (after 3 warm-up steps)."""
    cc, r = model.core_config, model.shell_config.resolution
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    z = torch.randn(batch, 3, r, r, device=device)
    text = (
        torch.randn(batch, device=device),
        torch.randn(batch, cc.text_len, cc.text_dim, device=device),
        torch.ones(batch, cc.text_len, dtype=torch.bool, device=device),
        torch.randn(batch, cc.text_dim, device=device),
    )

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = model(z, *text)
        (v.float() - z).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            tic = time.perf_counter()
            step()
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every batch")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    for core, family, batches in CONFIGS:
        for r, batch in batches.items():
            batch = max(1, int(batch * args.batch_scale))
            for compiled in (False, True):
                if time.perf_counter() - start > args.budget_s:
                    return
                torch.manual_seed(0)
                kind = "shallow" if r == 64 else "grown"
                model = UViT(core_preset(core), shell_preset(kind, r, family)).to(device)
                if compiled:
                    model.compile_blocks()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = step_time(model, batch, device, args.steps)
                flops = 3 * model.flops_per_image() * batch / seconds
                row = {
                    "core": core,
                    "shell": f"{family}-{kind}-{r}",
                    "batch": batch,
                    "compile": compiled,
                    "images_per_s": round(batch / seconds, 1),
                    "mfu": round(flops / (args.peak_tflops * 1e12), 3),
                    "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    if device.type == "cuda"
                    else None,
                }
                print(json.dumps(row), flush=True)
                del model
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
