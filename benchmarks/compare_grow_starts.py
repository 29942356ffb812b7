"""How fast a greedily grown model catches up with its core, for each way of starting phase 2.

Grows one phase-1 core (a `greedygrow demo` core by default) to 64 px, greedy (core frozen),
with the demo's phase-2 preset, once per start: grow.init fresh (new shell from its
initialisation) or preserve (the phase-1 shell kept inside, function-preserving), times
grow.core_logsnr pixel (the core reads the schedule's λ) or token (λ + 2 log(R/R₁)). Each run is
scored with `greedygrow evaluate` after each of --points phase-2 steps (the run is extended
step by step: run.steps is resumable), and the core once on the same prompts and seeds; prints a
Markdown table of DSG scores and the first scored step at which each start reaches the core.

    greedygrow demo --out demo
    python benchmarks/compare_grow_starts.py --core demo/core --out starts   # ~30 min, 2 cores

Run folders that exist are resumed and scores already written are kept, so a killed comparison
picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from greedygrow.demo import GROWN_RESOLUTION

STARTS = (("fresh", "pixel"), ("fresh", "token"), ("preserve", "pixel"), ("preserve", "token"))


def greedygrow(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "greedygrow", *args], check=True)


def score(model: Path, out: Path, args: argparse.Namespace) -> dict:
    """`greedygrow evaluate` of `model` into `out` (kept if there); its alignment summary."""
    if not (out / "metrics.json").is_file():
        seeds = [str(s) for s in range(args.seeds)]
        greedygrow(
            "evaluate",
            "--model",
            str(model),
            "--out",
            str(out),
            "--count",
            str(args.prompts),
            "--seeds",
            *seeds,
            "--guidance",
            "3",
            "--no-distribution",
        )
    return json.loads((out / "metrics.json").read_text())["runs"][0]["alignment"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", required=True, help="phase-1 run folder (e.g. demo/core)")
    parser.add_argument("--out", required=True, help="folder for the grown runs and scores")
    parser.add_argument("--points", type=int, nargs="+", default=[40, 80, 160, 320])
    parser.add_argument("--prompts", type=int, default=50, help="built-in scene prompts")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    args = parser.parse_args()

    out = Path(args.out)
    core = score(Path(args.core), out / "scores" / "core", args)
    rows = {}
    for init, logsnr in STARTS:
        name = f"{init}-{logsnr}"
        rows[name] = []
        for steps in args.points:
            greedygrow(
                "grow",
                "--core",
                args.core,
                "--resolution",
                str(GROWN_RESOLUTION),
                "--mode",
                "greedy",
                "--out",
                str(out / name),
                "--config",
                "demo-grow",
                f"run.steps={steps}",
                "run.progress=false",
                "run.sample_every=0",
                "model.compile=false",  # each extension would compile again
                f"grow.init={init}",
                f"grow.core_logsnr={logsnr}",
                f"data.text_cache_dir={out / 'text-cache'}",
                f"data.scene_cache_dir={out / 'scenes'}",
            )
            rows[name].append(score(out / name, out / "scores" / f"{name}-{steps}", args))
    print(
        f"\n{args.prompts} prompts × {args.seeds} seeds; core DSG {core['dsg_score']:.3f} "
        f"(entity {core['accuracy']['entity']:.2f})\n"
        f"| start (init, core λ) | {' | '.join(f'DSG @ {s}' for s in args.points)} | "
        "entity @ last | steps to reach the core |\n"
        f"|---|{'---:|' * len(args.points)}---:|---:|"
    )
    for name, scores in rows.items():
        dsg = [a["dsg_score"] for a in scores]
        reached = next(
            (s for s, d in zip(args.points, dsg, strict=True) if d >= core["dsg_score"]), None
        )
        print(
            f"| {name} | {' | '.join(f'{d:.3f}' for d in dsg)} | "
            f"{scores[-1]['accuracy']['entity']:.2f} | "
            f"{reached if reached is not None else f'> {args.points[-1]}'} |"
        )


if __name__ == "__main__":
    main()
