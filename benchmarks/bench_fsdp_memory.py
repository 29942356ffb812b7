"""Peak host memory per rank of saving and resuming FSDP2 training states (printed, not asserted).

    python benchmarks/bench_fsdp_memory.py [--core paper-0.5b] [--depth 5] [--nproc 2]

Launches `--nproc` processes with torchrun (gloo, CPU) three times, each building the trainer's
model, EMA and AdamW for `--core` (its depth overridden by `--depth`) in the shallow shell at
64 px with `run.parallel=fsdp`:
1. saves the training state as the trainer did before 2026-12-07 (format 1: model, EMA and
   optimizer gathered in full on rank 0's host and written there as one torch.save file);
2. saves it as the trainer does now (state.py: every rank writes its own shards), then writes
   the two exports (the EMA's and the raw weights; each tensor gathered in turn and written by
   rank 0);
3. resumes from the sharded state.
Each measurement is the rise of the process's peak RSS (VmHWM, reset before it) over its RSS
just before, so set-up does not count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field))
    return kb / 1024


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux); returns that RSS in MB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    return _rss_mb("VmRSS")


def worker(core: str, depth: int, run: Path, step: str) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from greedygrow.checkpoint import export_model
    from greedygrow.config import train_core_config
    from greedygrow.diffusion import schedule_for
    from greedygrow.distributed import init_distributed
    from greedygrow.run_folder import export_meta
    from greedygrow.state import save_state, state_path
    from greedygrow.trainable import FULL, Trainable

    cfg = train_core_config(
        None,
        [
            f"model.core={core}",
            f"model.core_overrides={{depth: {depth}}}",
            "model.resolution=64",
            "run.parallel=fsdp",
            "run.batch_size=2",
        ],
    )
    env = init_distributed("cpu")
    out: dict = {"rank": env.rank}
    if step == "resume":
        before = _reset_peak()
        trainable = Trainable(cfg, env, 1, state_path(run, 1))
        out["resume"] = _rss_mb("VmHWM") - before
    else:
        trainable = Trainable(cfg, env, 0, None)
        trainable.state()  # AdamW's moments exist from here on, as after a first step
        before = _reset_peak()
        if step == "full":
            model, optim = get_state_dict(trainable.model, trainable.optimizer, options=FULL)
            state = {"model": model, "optimizer": optim}
            state["ema"] = get_model_state_dict(trainable.ema, options=FULL)
            if env.main:
                torch.save(state, run / "full.pt")
            del state, model, optim
            out["state"] = _rss_mb("VmHWM") - before
        else:
            save_state(run, 1, trainable.state() | {"step": 1})
            out["state"] = _rss_mb("VmHWM") - before
            before = _reset_peak()
            meta = export_meta(cfg, 1, schedule_for(64, cfg.diffusion.schedule))
            for name, weights in trainable.exports().items():
                export_model(run, weights, meta, name=name)
            out["exports"] = _rss_mb("VmHWM") - before
    params = sum(p.numel() for p in trainable.model.parameters())  # DTensors: global numel
    out["full_copy"] = params * 4 / 2**20
    print(json.dumps(out), flush=True)
    torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, run: Path, step: str) -> dict[int, dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        step,
        "--core",
        args.core,
        "--depth",
        str(args.depth),
        "--state-dir",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["rank"]: r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", default="paper-0.5b", help="core preset")
    parser.add_argument("--depth", type=int, default=5, help="core depth (blocks)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", choices=["full", "sharded", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.core, args.depth, args.state_dir, args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        full = launch(args, Path(tmp), "full")
        sharded = launch(args, Path(tmp), "sharded")
        resumed = launch(args, Path(tmp), "resume")
    copy = full[0]["full_copy"]
    print(
        f"FSDP2 states of {args.core} at depth {args.depth} ({copy / 4 * 2**20 / 1e6:.0f}M "
        f"parameters, one fp32 copy {copy:,.0f} MB), shallow shell, 64 px, {args.nproc} "
        "processes, gloo/CPU; rise of peak RSS over RSS before, MB"
    )
    print(
        "| rank | state save, one file on rank 0 (before) | state save, sharded (now) "
        "| exports (EMA, raw; streamed) | resume from the sharded state |"
    )
    print("|---|---:|---:|---:|---:|")
    for rank in sorted(full):
        print(
            f"| {rank} | {full[rank]['state']:,.0f} | {sharded[rank]['state']:,.0f} "
            f"| {sharded[rank]['exports']:,.0f} | {resumed[rank]['resume']:,.0f} |"
        )


if __name__ == "__main__":
    main()
