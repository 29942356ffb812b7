"""Peak memory per rank of setting up FSDP2 training (figures printed, not asserted).

    python benchmarks/bench_fsdp_memory.py [--core paper-0.5b] [--nproc 2]

Launches `--nproc` processes with torchrun (gloo, CPU) twice. First each builds the trainer's
model, EMA and optimizer for `--core` in the shallow shell at 64 px with `run.parallel=fsdp`
(a fresh run) and rank 0 saves the training state; then each resumes from that state. Prints
each rank's peak RSS in both next to the size of one full fp32 copy of the weights. Rank 0
reads and materialises full weights on the host; every other rank only ever holds its shards
(of the model, the EMA and AdamW's moments).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(core: str, run: Path, resume: bool) -> None:
    import torch

    from greedygrow.checkpoint import load_latest_state, save_state
    from greedygrow.config import train_core_config
    from greedygrow.distributed import init_distributed
    from greedygrow.trainable import Trainable

    cfg = train_core_config(
        None,
        [f"model.core={core}", "model.resolution=64", "run.parallel=fsdp", "run.batch_size=2"],
    )
    env = init_distributed("cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if resume:  # as the trainer does: rank 0 reads, the others receive shards
        step, state = load_latest_state(run) if env.main else (1, None)
        trainable = Trainable(cfg, env, step, state)
        del state
    else:
        trainable = Trainable(cfg, env, 0, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in trainable.model.parameters())  # DTensors: global numel
    if not resume:
        state = trainable.full_state()  # collective; rank 0 gets it
        if env.main:
            save_state(run, 1, {"step": 1, **state})
        del state
    print(
        json.dumps(
            {
                "rank": env.rank,
                "before_mb": round(base),
                "peak_mb": round(peak),
                "full_copy_mb": round(params * 4 / 2**20),
            }
        ),
        flush=True,
    )
    torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, run: Path, resume: bool) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        "--core",
        args.core,
        "--state-dir",
        str(run),
        *(["--resume"] if resume else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return sorted(
        (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", default="paper-0.5b", help="core preset")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.core, args.state_dir, args.resume)
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = launch(args, Path(tmp), resume=False)
        resumed = launch(args, Path(tmp), resume=True)
    print(f"FSDP2 setup of {args.core} (shallow shell, 64 px), {args.nproc} processes, gloo/CPU")
    print(
        "| rank | RSS before (MB) | peak RSS, fresh run (MB) | peak RSS, resumed (MB) "
        "| one full fp32 copy (MB) |"
    )
    print("|---|---:|---:|---:|---:|")
    for a, b in zip(fresh, resumed, strict=True):
        print(
            f"| {a['rank']} | {a['before_mb']} | {a['peak_mb']} | {b['peak_mb']} "
            f"| {a['full_copy_mb']} |"
        )


if __name__ == "__main__":
    main()
