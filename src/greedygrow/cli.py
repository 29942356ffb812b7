"""The command line: the only module that parses arguments.

Each command has an `_add_<name>` function that declares its arguments and a `_run_<name>`
function that imports what it needs lazily (so `greedygrow info` starts fast) and does the
work. Keep each command's pair together; add a command by adding a pair and a line in
`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_info(args: argparse.Namespace) -> int:
    raise NotImplementedError("info: owned by the model work")


def _add_scenes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument("--resolution", type=int, default=None,
                   help="store images resized to this shorter side (default: native size)")
    p.add_argument("--format", choices=["folder", "webdataset"], default="folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-format", choices=["png", "jpg"], default="png")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar or subfolder")


def _run_scenes(args: argparse.Namespace) -> int:
    from greedygrow.data.scenes import write_dataset

    summary = write_dataset(
        args.out, args.count, args.resolution, args.format, args.seed,
        image_format=args.image_format, shard_size=args.shard_size, progress=True,
    )
    size = f"{args.resolution} px" if args.resolution else "native size"
    print(f"wrote {summary['count']} scenes ({args.format}, {size}) to {args.out}")
    for threshold, kept in summary["kept"].items():
        print(f"  native >= {threshold:>4} px: kept {kept} ({100 * kept / summary['count']:.1f}%)")
    return 0


def _add_encode_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data set: scenes, a folder or shard pattern")
    p.add_argument("--cache", required=True, help="embedding cache directory")
    p.add_argument("--encoder", default="minilm", help="minilm or hf:<name-or-path>")


def _run_encode_text(args: argparse.Namespace) -> int:
    raise NotImplementedError("encode-text: owned by the text work")


def _add_train_core(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (resumed if it exists)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _run_train_core(args: argparse.Namespace) -> int:
    from greedygrow.train import train, train_core_config

    return _refusing("train-core", lambda: train(
        train_core_config(args.config, args.overrides), args.out))


def _add_grow(p: argparse.ArgumentParser) -> None:
    p.add_argument("--core", required=True, help="phase-1 run folder holding the core")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--mode", choices=["greedy", "unfreeze", "joint", "scratch"],
                   default="greedy")
    p.add_argument("--freeze-steps", type=int, default=None)
    p.add_argument("--out", required=True, help="run folder (resumed if it exists)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _run_grow(args: argparse.Namespace) -> int:
    from greedygrow.train import grow_config, train

    return _refusing("grow", lambda: train(grow_config(
        args.core, args.resolution, args.mode, args.freeze_steps, args.config, args.overrides),
        args.out))


def _refusing(command: str, work: Callable[[], object]) -> int:
    """Run `work`; a bad config or a core that does not fit → message on stderr, status 2."""
    import logging

    from greedygrow.checkpoint import CheckpointMismatch
    from greedygrow.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        work()
    except (ConfigError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"greedygrow {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder with exported weights")
    p.add_argument("--out", required=True, help="output PNG grid")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=["ddim", "ancestral", "dpmpp2m"], default="dpmpp2m")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")


def _run_sample(args: argparse.Namespace) -> int:
    from greedygrow.train import sample_run

    return _refusing("sample", lambda: print(sample_run(
        args.model, args.out, args.prompts, steps=args.steps, sampler=args.sampler,
        guidance=args.guidance, seed=args.seed, per_prompt=args.per_prompt,
        resolution=args.resolution, ema=not args.raw)))


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder with exported weights")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--compare", nargs="*", default=[], help="more run folders to compare")


def _run_evaluate(args: argparse.Namespace) -> int:
    raise NotImplementedError("evaluate: owned by the evaluation work")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke test in under 2 minutes")


def _run_demo(args: argparse.Namespace) -> int:
    from greedygrow.train import demo

    return _refusing("demo", lambda: demo(args.out, quick=args.quick))


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "info": (_add_info, _run_info, "presets: parameters and FLOPs per image"),
    "scenes": (_add_scenes, _run_scenes, "write a procedural scenes data set"),
    "encode-text": (_add_encode_text, _run_encode_text, "precompute caption embeddings"),
    "train-core": (_add_train_core, _run_train_core, "phase 1: train a Shallow-UViT core"),
    "grow": (_add_grow, _run_grow, "phase 2: grow a core into a full shell"),
    "sample": (_add_sample, _run_sample, "sample a labelled image grid"),
    "evaluate": (_add_evaluate, _run_evaluate, "score a model and write a report"),
    "demo": (_add_demo, _run_demo, "the whole method on scenes, CPU-sized"),
}


def build_parser() -> argparse.ArgumentParser:
    """The `greedygrow` argument parser with one sub-command per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="greedygrow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run the chosen command; exit with its status."""
    args = build_parser().parse_args(argv)
    sys.exit(COMMANDS[args.command][1](args) or 0)
