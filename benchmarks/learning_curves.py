"""Learning curves of a recipe: DSG and its parts against training images and wall minutes.

Scores the EMA of every training state a run kept (run.keep) with the built-in scene prompts,
as `greedygrow evaluate` does, and reads images and wall time from the run's metrics.jsonl.
Give the runs in phase order (a grown run continues its core's axes). Writes the points as
JSON (scores kept there are not recomputed, so a killed scoring picks up where it was, and
points of states a run has since deleted stay on the curve) and the plot as PNG.

    python benchmarks/learning_curves.py --runs runs/scenes-core runs/scenes-128 \
        --json docs/figures/scenes-128-curves.json --plot docs/figures/scenes-128-curves.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from greedygrow.checkpoint import export_model, read_meta
from greedygrow.config import run_config
from greedygrow.evaluate.runs import Settings, builtin_prompts, evaluate_run
from greedygrow.state import list_states, load_state

PARTS = ("dsg_score", "all_correct", "entity", "count", "attribute")


def wall_seconds(run: Path) -> dict[int, float]:
    """Step → seconds of training since the run's first step, from metrics.jsonl: the time
    between log lines, except across a restart (a gap over 5× the line's own busy time), where
    the busy time (steps × batch / images_per_s) stands in."""
    batch = run_config(run).run.batch_size
    out, total, last_step, last_time = {}, 0.0, 0, None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        busy = (m["step"] - last_step) * batch / m["images_per_s"]
        gap = busy if last_time is None else m["time"] - last_time
        total += gap if gap <= 5 * busy else busy
        out[m["step"]] = total
        last_step, last_time = m["step"], m["time"]
    return out


def score_state(run: Path, step: int, path: Path, prompts, settings: Settings) -> dict:
    """The alignment summary of the EMA saved in training state `path`."""
    state = load_state(path)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(tmp, state["ema"], {**read_meta(run), "step": step})
        return evaluate_run(tmp, prompts, settings, name=f"{run.name}@{step}").alignment_summary


def flat(summary: dict) -> dict:
    """The curve's parts of one alignment summary."""
    return {
        "dsg_score": summary["dsg_score"],
        "all_correct": summary["all_correct"],
        **summary["accuracy"],
        "held_out_dsg_score": summary["held_out_dsg_score"],
    }


def plot(points: list[dict], out: Path) -> None:
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in (
        (axes[0], "images", "training images (both phases)"),
        (axes[1], "wall_minutes", "wall minutes on 2 CPU cores (both phases)"),
    ):
        for part in PARTS:
            xs = [p[key] for p in points if part in p]
            ax.plot(xs, [p[part] for p in points if part in p], marker="o", ms=3, label=part)
        ends = [p[key] for p in points if p["phase"] == "grow"]
        if ends:
            ax.axvline(min(ends), color="grey", ls=":", lw=1)
            ax.text(min(ends), 1.0, " grown to 128 px", fontsize=8, va="top", color="grey")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy / score")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders, in phase order")
    parser.add_argument("--json", required=True, help="points file (kept scores are reused)")
    parser.add_argument("--plot", required=True, help="PNG to write")
    parser.add_argument("--prompts", type=int, default=50, help="built-in scene prompts")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    parser.add_argument("--every", type=int, default=1, help="score every k-th kept state")
    args = parser.parse_args()
    path = Path(args.json)
    done = {(p["run"], p["step"]): p for p in json.loads(path.read_text())} if path.exists() else {}
    prompts = builtin_prompts(args.prompts)
    settings = Settings(seeds=tuple(range(args.seeds)))
    points, images0, seconds0 = [], 0, 0.0
    for run in map(Path, args.runs):
        cfg, wall = run_config(run), wall_seconds(run)
        states = list_states(run)
        for step, state in states[:: -args.every][::-1]:  # always the last state
            key = (run.name, step)
            if key not in done:
                done[key] = {
                    "run": run.name,
                    "step": step,
                    "phase": cfg.phase,
                    "images": images0 + step * cfg.run.batch_size,
                    "wall_minutes": (seconds0 + wall[step]) / 60,
                    **flat(score_state(run, step, state, prompts, settings)),
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(list(done.values()), indent=1))
                print(json.dumps(done[key]), flush=True)
        # every point of the run kept in the JSON: states since deleted (run.keep) included
        points += sorted(
            (p for p in done.values() if p["run"] == run.name), key=lambda p: p["step"]
        )
        last = max(wall)
        images0, seconds0 = images0 + last * cfg.run.batch_size, seconds0 + wall[last]
    plot(points, Path(args.plot))
    print(f"wrote {args.plot} and {args.json}")


if __name__ == "__main__":
    main()
