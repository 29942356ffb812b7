"""Greedy growing against the paper's three baselines, at CPU scale on the built-in scenes.

Grows one phase-1 core (a `greedygrow demo` core by default) to 64 px in each mode — greedy
(core frozen for ever), unfreeze (frozen for half the steps, then trained), joint (phase-1
core trained from step 0) and scratch (no phase-1 core) — with the demo's phase-2 preset
(demo-grow) and the same number of steps, then scores all of them and the core with
`greedygrow evaluate --compare` and prints a Markdown table.

    greedygrow demo --out demo                                   # makes demo/core
    python benchmarks/compare_modes.py --core demo/core --out modes   # ~25 min on 2 cores

A run folder that already exists is resumed, so a killed comparison picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from greedygrow.demo import GROWN_RESOLUTION

MODES = ("greedy", "unfreeze", "joint", "scratch")


def greedygrow(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "greedygrow", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", required=True, help="phase-1 run folder (e.g. demo/core)")
    parser.add_argument("--out", required=True, help="folder for the grown runs and report")
    parser.add_argument("--steps", type=int, default=320, help="phase-2 steps per mode")
    parser.add_argument("--prompts", type=int, default=32, help="built-in scene prompts")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="phase-2 scenes drawn (data.count, before the high-resolution filter); small "
        "values model a scarce high-resolution subset (default: the demo's)",
    )
    args = parser.parse_args()

    out = Path(args.out)
    overrides = [
        f"run.steps={args.steps}",
        "run.progress=false",
        f"data.text_cache_dir={out / 'text-cache'}",
        *([f"data.count={args.count}"] if args.count else []),
    ]
    seconds = {}
    for mode in MODES:
        tic = time.time()
        flags = ["--freeze-steps", str(args.steps // 2)] if mode == "unfreeze" else []
        greedygrow(
            "grow",
            "--core",
            args.core,
            "--resolution",
            str(GROWN_RESOLUTION),
            "--mode",
            mode,
            *flags,
            "--out",
            str(out / mode),
            "--config",
            "demo-grow",
            *overrides,
        )
        seconds[mode] = time.time() - tic
    greedygrow(
        "evaluate",
        "--model",
        args.core,
        "--compare",
        *(str(out / m) for m in MODES),
        "--out",
        str(out / "report"),
        "--count",
        str(args.prompts),
        "--seeds",
        *(str(s) for s in range(args.seeds)),
        "--steps",
        "20",
        "--guidance",
        "3",
        "--no-distribution",
    )
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    print(
        f"\n{args.prompts} prompts × {args.seeds} seeds, {args.steps} phase-2 steps per mode\n"
        "| model | phase-2 s | DSG score | held-out pairs DSG | entity | count | all correct |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for i, run in enumerate(metrics["runs"]):  # the core first, then MODES in order
        a = run["alignment"]
        label = "core (phase 1)" if i == 0 else MODES[i - 1]
        took = f"{seconds[label]:.0f}" if label in seconds else "—"
        print(
            f"| {label} | {took} | {a['dsg_score']:.2f} | {a['held_out_dsg_score']:.2f} | "
            f"{a['accuracy']['entity']:.2f} | {a['accuracy']['count']:.2f} | "
            f"{a['all_correct']:.2f} |"
        )


if __name__ == "__main__":
    main()
