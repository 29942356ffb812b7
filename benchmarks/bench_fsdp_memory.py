"""Peak memory per rank of setting up FSDP2 training (figures printed, not asserted).

    python benchmarks/bench_fsdp_memory.py [--core paper-0.5b] [--nproc 2]

Launches `--nproc` processes with torchrun (gloo, CPU) that each build the trainer's model,
EMA and optimizer for `--core` in the shallow shell at 64 px with `run.parallel=fsdp`, and
prints each rank's peak RSS next to the size of one full fp32 copy of the weights. Rank 0
materialises the initial weights once on the host; every other rank only ever holds its
shards (of the model and of the EMA), so its peak is a fraction of one full copy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def worker(core: str) -> None:
    import torch

    from greedygrow.train import Trainable, init_distributed, train_core_config

    cfg = train_core_config(
        None,
        [f"model.core={core}", "model.resolution=64", "run.parallel=fsdp", "run.batch_size=2"],
    )
    env = init_distributed("cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = Trainable(cfg, env, 0, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in trainable.model.parameters())  # DTensors: global numel
    print(
        json.dumps(
            {
                "rank": env.rank,
                "before_mb": round(base),
                "peak_mb": round(peak),
                "full_copy_mb": round(params * 4 / 2**20),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", default="paper-0.5b", help="core preset")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.core)
        return
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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    rows = sorted(
        (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
        key=lambda r: r["rank"],
    )
    print(f"FSDP2 setup of {args.core} (shallow shell, 64 px), {args.nproc} processes, gloo/CPU")
    print("| rank | RSS before (MB) | peak RSS after setup (MB) | one full fp32 copy (MB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rank']} | {r['before_mb']} | {r['peak_mb']} | {r['full_copy_mb']} |")


if __name__ == "__main__":
    main()
