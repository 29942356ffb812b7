"""Model benchmarks: training-step throughput, model FLOP utilisation, cost vs resolution.

    python benchmarks/bench_model.py                    # print the tables
    python benchmarks/bench_model.py --write docs/performance.md   # and update its "Model" section

1. The machine's own matmul rate (fp32, bf16), measured in this run: the denominator of MFU.
2. A training step (forward, backward, AdamW) of each CPU core preset in the cpu shallow
   shell at 64 px, batch 32, fp32 and bf16 autocast: images/s and
   MFU = 3 · forward FLOPs per image · images/s / matmul rate (backward = 2 × forward).
3. A training step of one fixed core inside the cpu shells at 32 and 64 px (shallow) and at
   64, 128, 256 and 512 px (grown), and of the core alone: the core's time stays fixed, the
   rest is the shell's.
Figures are printed, not asserted; on a shared machine they are noisy (the load average is
printed beside them).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from greedygrow.allocator import keep_freed_memory
from greedygrow.model import (
    CORE_PRESETS,
    SHELL_PRESETS,
    UViT,
    count_flops,
    count_parameters,
    preset_table,
    shell_preset,
)

TEXT_TOKENS = 16


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object], steps: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall time and median process CPU time of `fn`, in seconds, over `steps` calls
    after `warmup` calls. CPU time is the steadier figure on a shared machine."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def matmul_rate(dtype: torch.dtype, n: int, steps: int) -> tuple[float, float]:
    """FLOPs per wall second and per CPU second of an n×n by n×n matmul (2n³ FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    wall, cpu = timed(lambda: a @ b, steps)
    return 2 * n**3 / wall, 2 * n**3 / cpu


def train_step_fn(model: UViT, batch: int, bf16: bool, compile: bool) -> Callable[[], None]:
    """One AdamW training step of `model` on random data, as a closure (as training runs it:
    fused AdamW, and the blocks compiled when `compile`)."""
    cc, r = model.core_config, model.shell_config.resolution
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if compile:
        model.compile_blocks()
    z = torch.randn(batch, 3, r, r)
    text = dict(
        logsnr=torch.randn(batch),
        text_tokens=torch.randn(batch, TEXT_TOKENS, cc.text_dim),
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        text_pooled=torch.randn(batch, cc.text_dim),
        drop_text=torch.rand(batch) < 0.1,
    )

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            loss = (model(z, **text).float() - z).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def core_step_fn(model: UViT, batch: int, bf16: bool, compile: bool) -> Callable[[], None]:
    """Forward + backward of the core alone (with its conditioning) on random tokens."""
    cc = model.core_config
    if compile:
        model.compile_blocks()
    x = torch.randn(batch, cc.tokens, cc.width)
    text = (
        torch.randn(batch),
        torch.randn(batch, TEXT_TOKENS, cc.text_dim),
        torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        torch.randn(batch, cc.text_dim),
    )

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            out = model.core(x, model.core.embed(*text))
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def bench_presets(
    batch: int, steps: int, rates: dict[str, tuple[float, float]], compile: bool
) -> list[str]:
    rows = [
        "| core | params core + shell | fwd GFLOPs/img | dtype | step s | CPU s/step | "
        "images/s | images/CPU-s | MFU | MFU per CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shell = SHELL_PRESETS["cpu-shallow-64"]
    for name, core in CORE_PRESETS.items():
        if not name.startswith("cpu-"):
            continue
        params, flops = count_parameters(core, shell), count_flops(core, shell)["total"]
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = UViT(core, shell)
            wall, cpu = timed(train_step_fn(model, batch, dtype == "bf16", compile), steps, 2)
            # MFU = 3 · F_fwd · B / t / peak  (backward ≈ 2 × forward; PaLM appendix B)
            step_flops = 3 * flops * batch
            mfu, mfu_cpu = step_flops / wall / rates[dtype][0], step_flops / cpu / rates[dtype][1]
            rows.append(
                f"| {name} | {params['core'] / 1e6:.2f}M + {params['shell'] / 1e6:.2f}M | "
                f"{flops / 1e9:.2f} | {dtype} | {wall:.2f} | {cpu:.2f} | {batch / wall:.1f} | "
                f"{batch / cpu:.1f} | {100 * mfu:.0f}% | {100 * mfu_cpu:.0f}% |"
            )
            print(rows[-1], flush=True)
    return rows


def bench_resolutions(
    core_name: str, batch: int, steps: int, bf16: bool, compile: bool
) -> list[str]:
    core = CORE_PRESETS[core_name]
    rows = [
        "| shell | fwd GFLOPs/img core + shell | step s | CPU s/step | CPU ms/img | "
        "shell CPU ms/img | shell CPU µs/px |",
        "|---|---|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    shallow = SHELL_PRESETS["cpu-shallow-64"]
    core_wall, core_cpu = timed(core_step_fn(UViT(core, shallow), batch, bf16, compile), steps, 2)
    core_gflops = count_flops(core, shallow)["core"] / 1e9
    rows.append(
        f"| (core alone, fwd + bwd) | {core_gflops:.2f} + 0 | {core_wall:.2f} | "
        f"{core_cpu:.2f} | {1e3 * core_cpu / batch:.0f} | | |"
    )
    print(rows[-1], flush=True)
    shells = [
        ("shallow", 32),
        ("shallow", 64),
        ("grown", 64),
        ("grown", 128),
        ("grown", 256),
        ("grown", 512),
    ]
    for kind, r in shells:
        shell = shell_preset(kind, r, family="cpu")
        flops = count_flops(core, shell)
        torch.manual_seed(0)
        wall, cpu = timed(train_step_fn(UViT(core, shell), batch, bf16, compile), steps, 2)
        shell_cpu = (cpu - core_cpu) / batch
        rows.append(
            f"| cpu-{kind}-{r} | {flops['core'] / 1e9:.2f} + {flops['shell'] / 1e9:.2f} | "
            f"{wall:.2f} | {cpu:.2f} | {1e3 * cpu / batch:.0f} | {1e3 * shell_cpu:.0f} | "
            f"{1e6 * shell_cpu / r**2:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def paper_table() -> list[str]:
    """Parameters and forward FLOPs per image of the paper-scale presets (computed, not timed)."""
    rows = [
        "| core | shell | core params | shell params | fwd GFLOPs/img core + shell |",
        "|---|---|---|---|---|",
    ]
    for r in preset_table("paper"):
        rows.append(
            f"| {r['core']} | {r['shell']} | {r['core_params'] / 1e9:.2f}B | "
            f"{r['shell_params'] / 1e6:.1f}M | {r['core_flops'] / 1e9:.0f} + "
            f"{r['shell_flops'] / 1e9:.0f} |"
        )
    return rows


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the "## Model" section of `path`, leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Performance\n"
    section = f"## Model\n\n{body.strip()}\n"
    pattern = re.compile(r"^## Model\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--batch", type=int, default=32, help="batch for the preset table")
    parser.add_argument("--grow-batch", type=int, default=4, help="batch for the R table")
    parser.add_argument("--grow-core", default="cpu-small", help="core for the R table")
    parser.add_argument("--grow-dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--eager", action="store_true", help="do not compile the blocks")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 is steadier when shared",
    )
    parser.add_argument(
        "--write", type=Path, default=None, help="update this markdown file's 'Model' section"
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the greedygrow command does
    load_before = os.getloadavg()[0]
    machine = (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(machine, flush=True)
    rates = {
        "fp32": matmul_rate(torch.float32, args.matmul_size, args.steps),
        "bf16": matmul_rate(torch.bfloat16, args.matmul_size, args.steps),
    }
    rate_line = (
        f"matmul rate ({args.matmul_size}²), GFLOP/s per wall second / per CPU second: "
        f"fp32 {rates['fp32'][0] / 1e9:.0f} / {rates['fp32'][1] / 1e9:.0f}, "
        f"bf16 {rates['bf16'][0] / 1e9:.0f} / {rates['bf16'][1] / 1e9:.0f}"
    )
    print(rate_line, flush=True)
    compile = not args.eager
    presets = bench_presets(args.batch, args.steps, rates, compile)
    grow = bench_resolutions(
        args.grow_core, args.grow_batch, args.steps, args.grow_dtype == "bf16", compile
    )
    load_after = os.getloadavg()[0]

    body = "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} with `python "
            f"benchmarks/bench_model.py {' '.join(sys.argv[1:])}` on {machine}; load average "
            f"{load_before:.1f} before, "
            f"{load_after:.1f} after (above ≈ 1: another job shared the cores; read the per "
            "CPU-s columns).",
            "",
            rate_line + " — the denominator of MFU.",
            "",
            f"Training step (forward, backward, fused AdamW) at 64 px in the `cpu-shallow-64` "
            f"shell, batch {args.batch}, median of {args.steps} steps after 2 warm-up steps, "
            f"blocks {'eager' if args.eager else 'compiled (`model.compile`)'}. "
            "MFU = 3 × forward FLOPs × images/s ÷ the matmul rate of the same dtype (FLOPs: "
            "matrix products only, counted by the layers); *per CPU-s* columns use process CPU "
            "time instead of wall time on both sides, the steadier figure on a shared machine.",
            "",
            *presets,
            "",
            f"Cost against resolution: the `{args.grow_core}` core in the `cpu` shells, training "
            f"step at batch {args.grow_batch}, {args.grow_dtype}. The core alone costs the same at "
            "every R; shell CPU ms/img is the step minus the core alone (it includes AdamW). The "
            "cpu family narrows its channels as levels are added, so the shell's cost per pixel "
            "falls as R grows instead of staying constant.",
            "",
            *grow,
            "",
            "Paper-scale presets (from `greedygrow info --family paper`; computed on the meta "
            "device, so exact and machine-independent):",
            "",
            *paper_table(),
        ]
    )
    print()
    print(body)
    if args.write is not None:
        write_section(args.write, body)
        print(f"\nwrote the Model section of {args.write}")


if __name__ == "__main__":
    main()
