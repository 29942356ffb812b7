"""Training throughput and memory on the CPU presets (figures printed, not asserted).

    python benchmarks/bench_train.py [--steps 10] [--quick]

Measures, each in a fresh process (so peak memory is its own):
  * images/s of a full training step (data, cached text, forward, backward, AdamW, EMA) for
    train-core (preset core-cpu: cpu-small core, shallow shell, 32 px, batch 32) and
    grow (preset grow-cpu: greedy, grown cpu shell, 64 px, batch 16), with 1 and 2
    processes (torchrun, gloo, DDP), fp32 and bf16;
  * peak memory of one greedy grown step at 512 px (cpu-small core, cpu shell family,
    batch 2) with and without gradient checkpointing (peak RSS on CPU; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_core(folder: Path, cache: str) -> None:
    """A phase-1 run folder with random weights: all `grow` needs (config.yaml + export)."""
    import torch

    from greedygrow.checkpoint import export_model
    from greedygrow.config import core_config, save_config, shell_config, train_core_config
    from greedygrow.model import UViT

    cfg = train_core_config("core-cpu", [cache])
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    export_model(folder, UViT(core_config(cfg), shell_config(cfg)), {})


def worker(args: argparse.Namespace) -> None:
    """Run `args.steps` timed steps after 2 warm-up steps; rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from greedygrow.config import grow_config, train_core_config
    from greedygrow.diffusion import schedule_for
    from greedygrow.distributed import init_distributed
    from greedygrow.text import load_text_encoder
    from greedygrow.text_cache import CachedTextEncoder
    from greedygrow.train import _data, _loss, _set_lr
    from greedygrow.trainable import Trainable

    over = [
        f"run.precision={args.precision}",
        f"data.text_cache_dir={args.cache}",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
        f"run.steps={2 + args.steps}",
    ]
    if args.batch:
        over.append(f"run.batch_size={args.batch}")
    if args.phase == "core":
        cfg = train_core_config("core-cpu", over)
    else:
        cfg = grow_config(args.core, args.resolution, "greedy", None, "grow-cpu", over)
    env = init_distributed(cfg.run.device)
    encoder = CachedTextEncoder(
        load_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length), args.cache
    )
    schedule = schedule_for(cfg.model.resolution, cfg.diffusion.schedule)
    trainable = Trainable(cfg, env, 0, None)
    batches, table = _data(cfg, env, 0, Path(args.cache).parent, encoder)  # text table: 2 + N
    text = encoder if table is None else table
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = 2 + args.steps
    for step in range(total):
        if step == 2:
            if env.world > 1:
                dist.barrier()
            tic = time.perf_counter()
        _set_lr(trainable.optimizer, cfg, step)
        _, skipped = trainable.optimizer_step(_loss(trainable, next(batches), text, schedule, step))
        trainable.update_ema(step + 1, skipped)
    elapsed = time.perf_counter() - tic
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    if env.main:
        print(
            json.dumps(
                {
                    "phase": args.phase,
                    "resolution": cfg.model.resolution,
                    "processes": env.world,
                    "precision": args.precision,
                    "batch": cfg.run.batch_size,
                    "checkpointing": args.checkpointing,
                    "images_per_s": args.steps * cfg.run.batch_size / elapsed,
                    "step_s": elapsed / args.steps,
                    "rss_before_mb": rss0,
                    "peak_mb": peak,
                }
            )
        )
    if env.world > 1:
        dist.destroy_process_group()


def _launch(nproc: int, *worker_args: str) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", *worker_args]
    cmd = (
        [sys.executable, *me]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *me,
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--quick", action="store_true", help="one precision, one process count")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="core", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--core", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache, core = str(Path(tmp) / "text-cache"), Path(tmp) / "core"
        _write_core(core, f"data.text_cache_dir={cache}")
        common = ["--steps", str(args.steps), "--cache", cache, "--core", str(core)]
        rows = []
        for phase in ("core", "grow"):
            for nproc in (1,) if args.quick else (1, 2):
                for precision in ("bf16",) if args.quick else ("fp32", "bf16"):
                    rows.append(_launch(nproc, *common, "--phase", phase, "--precision", precision))
        print("| phase | px | processes | precision | batch | images/s | s/step |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['phase']} | {r['resolution']} | {r['processes']} | {r['precision']} | "
                f"{r['batch']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} |"
            )
        print("\n| 512 px grown step (batch 2, fp32) | RSS before step (MB) | peak (MB) |")
        print("|---|---|---|")
        for ckpt in (False, True):
            r = _launch(
                1,
                "--steps",
                "1",
                "--cache",
                cache,
                "--core",
                str(core),
                "--phase",
                "grow",
                "--resolution",
                "512",
                "--batch",
                "2",
                *(["--checkpointing"] if ckpt else []),
            )
            print(
                f"| gradient checkpointing {'on' if ckpt else 'off'} | "
                f"{r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
