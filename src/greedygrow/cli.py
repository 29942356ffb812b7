"""The command line: the only module that parses arguments.

A command is an `_add_<name>` (its arguments) and `_run_<name>` (lazy imports, the work) pair
and a line in `COMMANDS`. `main` is the one error boundary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from greedygrow.allocator import keep_freed_memory
from greedygrow.config import GROW_MODES
from greedygrow.data.split import rank_and_world
from greedygrow.model import SHELL_FAMILIES
from greedygrow.sampling import DEFAULT_STEPS, SAMPLERS
from greedygrow.stopping import Preempted, RunStopped


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--family",
        choices=sorted(SHELL_FAMILIES),
        default=None,
        help="only the presets of this family (default: all)",
    )


def _run_info(args: argparse.Namespace) -> int:
    import json

    from greedygrow.model import CORE_PRESETS, SHELL_PRESETS, preset_family, preset_table

    rows = preset_table(args.family)
    cores = {k: v for k, v in CORE_PRESETS.items() if args.family in (None, preset_family(k))}
    shells = {k: v for k, v in SHELL_PRESETS.items() if args.family in (None, preset_family(k))}
    if args.json:
        cores_json = {k: v.to_dict() for k, v in cores.items()}
        shells_json = {k: v.to_dict() for k, v in shells.items()}
        print(json.dumps({"cores": cores_json, "shells": shells_json, "table": rows}, indent=2))
        return 0
    print("core presets (width × depth, heads, grid):")
    for name, c in cores.items():
        print(f"  {name:<12} {c.width} × {c.depth}, {c.heads} heads, {c.grid}×{c.grid} grid")
    print("shell presets (channels per level from R down; ResBlocks per level):")
    for name, s in shells.items():
        print(f"  {name:<18} {s.kind:<7} {s.resolution:>4} px  {s.channels}  {s.blocks}")
    print("\nparameters and forward FLOPs per image (GFLOPs; 1 multiply-add = 2 FLOPs)")
    head = ("core", "shell", "R", "core params", "shell params", "core GF", "shell GF", "total GF")
    print(f"{head[0]:<12} {head[1]:<18} {head[2]:>5} " + " ".join(f"{h:>12}" for h in head[3:]))
    for r in rows:
        print(
            f"{r['core']:<12} {r['shell']:<18} {r['resolution']:>5} "
            f"{r['core_params'] / 1e6:>11.1f}M {r['shell_params'] / 1e6:>11.2f}M "
            f"{r['core_flops'] / 1e9:>12.2f} {r['shell_flops'] / 1e9:>12.2f} "
            f"{r['flops_per_image'] / 1e9:>12.2f}"
        )
    return 0


def _add_scenes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--count", type=int, required=True, help="number of samples")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="store images resized to this shorter side (default: native size)",
    )
    p.add_argument("--format", choices=["folder", "webdataset"], default="folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-format", choices=["png", "jpg"], default="png")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar or subfolder")


def _run_scenes(args: argparse.Namespace) -> int:
    from greedygrow.data.scenes import write_dataset

    summary = write_dataset(
        args.out,
        args.count,
        args.resolution,
        args.format,
        args.seed,
        image_format=args.image_format,
        shard_size=args.shard_size,
        progress=True,
    )
    size = f"{args.resolution} px" if args.resolution else "native size"
    print(f"wrote {summary['count']} scenes ({args.format}, {size}) to {args.out}")
    for threshold, kept in summary["kept"].items():
        print(f"  native >= {threshold:>4} px: kept {kept} ({100 * kept / summary['count']:.1f}%)")
    return 0


def _add_encode_text(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="scenes:COUNT, an image folder, or webdataset shards (pattern, list or folder of "
        ".tar); prefix folder: or webdataset: to force the reader",
    )
    p.add_argument("--cache", required=True, help="embedding cache directory")
    p.add_argument("--encoder", default="minilm", help="minilm or hf:<name-or-path>")
    p.add_argument(
        "--max-length",
        type=int,
        default=32,
        help="text tokens kept per caption (must equal the model's text_len)",
    )
    p.add_argument("--seed", type=int, default=0, help="scenes seed")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder forward")
    p.add_argument("--device", default="cpu", help="device for the text encoder")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader workers for webdataset shards (their images are decoded)",
    )


def _run_encode_text(args: argparse.Namespace) -> int:
    import itertools
    import time

    from greedygrow.data import captions
    from greedygrow.text import load_text_encoder
    from greedygrow.text_cache import CachedTextEncoder

    texts = captions(args.data, args.seed, args.workers)
    encoder = load_text_encoder(
        args.encoder, max_length=args.max_length, device=args.device, batch_size=args.batch_size
    )
    total, start = 0, time.perf_counter()
    with CachedTextEncoder(encoder, args.cache, shard_size=4096) as cached:
        while chunk := list(itertools.islice(texts, 4096)):
            cached.encode(chunk)
            total += len(chunk)
            print(f"\r{total} captions, {cached.misses} encoded", end="", file=sys.stderr)
    print(file=sys.stderr)
    seconds = time.perf_counter() - start
    rate = f"{cached.misses / seconds:.1f} captions/s" if cached.misses else "nothing to encode"
    print(f"encoder {encoder.id} on {args.device}")
    print(
        f"captions: {total}; encoded now: {cached.misses} distinct new captions in "
        f"{seconds:.1f} s ({rate}); the other {total - cached.misses} were cached or repeats"
    )
    size_mib = cached.size_bytes() / 2**20
    print(f"cache: {cached.directory}: {len(cached)} entries, {size_mib:.1f} MiB")
    return 0


def _add_train_core(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder (resumed if it exists)")
    p.add_argument("--config", default=None, help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def _run_train_core(args: argparse.Namespace) -> int:
    from greedygrow.config import train_core_config
    from greedygrow.train import train

    train(train_core_config(args.config, args.overrides), args.out)
    return 0


def _add_grow(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--core",
        required=True,
        help="run folder holding the core (phase 1, or a grown run), or a shipped model's name",
    )
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--mode", choices=GROW_MODES, default="greedy")
    p.add_argument("--freeze-steps", type=int, default=None)
    _add_train_core(p)


def _run_grow(args: argparse.Namespace) -> int:
    from greedygrow.config import grow_config
    from greedygrow.shipped import resolve_model
    from greedygrow.train import train

    cfg = grow_config(
        str(resolve_model(args.core)),
        args.resolution,
        args.mode,
        args.freeze_steps,
        args.config,
        args.overrides,
    )
    train(cfg, args.out)
    return 0


def _add_sampling(p: argparse.ArgumentParser, out: str) -> None:
    """The arguments `sample` and `evaluate` share."""
    p.add_argument(
        "--model",
        required=True,
        help="run folder with exported weights, or a shipped model's name (greedygrow models)",
    )
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--sampler", choices=SAMPLERS, default="dpmpp2m")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default per sampler: {DEFAULT_STEPS})",
    )
    p.add_argument("--guidance", type=float, default=None, help="default: the run's own")
    p.add_argument("--raw", action="store_true", help="use raw weights instead of EMA")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model under bf16 autocast (default: where the device computes bf16 "
        "natively, e.g. CUDA or CPUs with AVX512-BF16/AMX)",
    )


def _add_sample(p: argparse.ArgumentParser) -> None:
    _add_sampling(p, "output PNG grid")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="guide only at log-SNRs in [LO, HI] (default: every step)",
    )


def _run_sample(args: argparse.Namespace) -> int:
    from greedygrow.sample import sample_to_png
    from greedygrow.shipped import resolve_model

    path = sample_to_png(
        resolve_model(args.model),
        args.out,
        args.prompts,
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        seed=args.seed,
        per_prompt=args.per_prompt,
        resolution=args.resolution,
        ema=not args.raw,
        guidance_interval=args.guidance_interval,
        bf16=args.bf16,
    )
    print(path)
    return 0


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    _add_sampling(p, "report directory")
    p.add_argument(
        "--compare", nargs="*", default=[], help="more run folders (or shipped models) to compare"
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="text file, one prompt per line (default: built-in scene prompts); "
        "scenes captions in it are scored for alignment too",
    )
    p.add_argument("--count", type=int, default=50, help="number of built-in scene prompts")
    p.add_argument(
        "--references",
        default=None,
        help="folder of reference images for FID/FD-DINOv2/CMMD (default for scene "
        "prompts: their ground-truth renders)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one image per prompt per seed"
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="resize samples to this before scoring (compare runs at one size)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--inception",
        default=None,
        help="FID Inception weights (.pth/.safetensors; or GREEDYGROW_INCEPTION)",
    )
    p.add_argument("--dino", default=None, help="DINOv2 hub name or folder")
    p.add_argument("--clip", default=None, help="CLIP hub name or folder")
    p.add_argument(
        "--no-distribution", action="store_true", help="skip FID / FD-DINOv2 / CMMD / CLIPScore"
    )
    p.add_argument(
        "--stats-cache",
        default=None,
        help="reference statistics cache (default ~/.cache/greedygrow/reference-stats)",
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    from greedygrow.distributed import resolve_device
    from greedygrow.evaluate.distribution import Extractors
    from greedygrow.evaluate.report import Settings, evaluate
    from greedygrow.shipped import resolve_model

    device = str(resolve_device(args.device))
    extractors = None
    if not args.no_distribution:
        extractors = Extractors.load(args.inception, args.dino, args.clip, device=device)
    settings = Settings(
        sampler=args.sampler,
        steps=DEFAULT_STEPS[args.sampler] if args.steps is None else args.steps,
        guidance=args.guidance,
        seeds=tuple(args.seeds),
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=device,
        ema=not args.raw,
        bf16=args.bf16,
    )
    paths = evaluate(
        str(resolve_model(args.model)),
        args.out,
        [str(resolve_model(m)) for m in args.compare],
        args.prompts,
        args.count,
        args.references,
        settings,
        extractors,
        args.stats_cache,
    )
    for name, path in paths.items():
        print(f"{name:8s} {path}")
    return 0


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_models(args: argparse.Namespace) -> int:
    import json

    from greedygrow.checkpoint import read_meta
    from greedygrow.shipped import describe, shipped_models

    models = shipped_models()
    if args.json:
        print(json.dumps({k: {"path": str(v), **read_meta(v)} for k, v in models.items()}))
        return 0
    if not models:
        print("no models are shipped with this installation")
    for name, folder in models.items():
        print(describe(name, folder))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (its EMA export is written)")
    p.add_argument("--out", required=True, help="model folder to write (replaced if there)")
    p.add_argument("--card", default=None, help="JSON file: figures kept in the meta's card")


def _run_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from greedygrow.shipped import ship

    card = json.loads(Path(args.card).read_text()) if args.card else {}
    out = ship(args.run, args.out, card)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"{out}: bf16 weights, {size:.1f} MB; sample it with greedygrow sample --model {out}")
    return 0


def _add_ema(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder trained with optim.posthoc_ema")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True, help="relative EMA lengths")
    p.add_argument("--step", type=int, default=None, help="the step (default: the last snapshot)")
    p.add_argument("--out", default=None, help="folder of the folders (default: the run)")


def _run_ema(args: argparse.Namespace) -> int:
    from pathlib import Path

    from greedygrow.posthoc_ema import export_posthoc

    for sigma_rel in args.sigma_rel:
        out = Path(args.out or args.run) / f"ema-{sigma_rel:g}"
        path, info = export_posthoc(Path(args.run), sigma_rel, out, args.step)
        print(
            f"{path}: EMA σ_rel={sigma_rel:g} at step {info['step']} from {info['snapshots']} "
            "snapshot profiles"
        )
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke test in under 2 minutes")


def _run_demo(args: argparse.Namespace) -> int:
    from greedygrow.demo import demo

    demo(args.out, quick=args.quick)
    return 0


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "info": (_add_info, _run_info, "presets: parameters and FLOPs per image"),
    "scenes": (_add_scenes, _run_scenes, "write a procedural scenes data set"),
    "encode-text": (_add_encode_text, _run_encode_text, "precompute caption embeddings"),
    "train-core": (_add_train_core, _run_train_core, "phase 1: train a Shallow-UViT core"),
    "grow": (_add_grow, _run_grow, "phase 2: grow a core into a full shell"),
    "sample": (_add_sample, _run_sample, "sample a labelled image grid"),
    "evaluate": (_add_evaluate, _run_evaluate, "score a model and write a report"),
    "export": (_add_export, _run_export, "write a run as a self-contained bf16 model folder"),
    "models": (_add_models, _run_models, "list the models shipped with the package"),
    "ema": (_add_ema, _run_ema, "synthesise an EMA of any length after training (EDM2)"),
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
    """Parse `argv` and run the chosen command; exit with its status. A bad config, input or
    checkpoint (ValueError, among them ConfigError and CheckpointMismatch) or a missing file is
    reported on stderr with exit status 2; a run stopped by run.nonfinite with status 1; a
    preempted run, its state saved, with status 0 (so a requeued job resumes)."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = COMMANDS[args.command][1](args)
    except Preempted as e:  # saved: a requeued job resumes
        print(f"greedygrow {args.command}: {e}", file=sys.stderr)
        status = 0
    except RunStopped as e:
        print(f"greedygrow {args.command}: stopped: {e}", file=sys.stderr)
        status = 1
    except (ValueError, FileNotFoundError) as e:
        print(f"greedygrow {args.command}: error: {e}", file=sys.stderr)
        status = 2
    _exit(status)


def _exit(status: int) -> NoReturn:
    """Exit with `status`. A torchrun worker flushes its output and leaves with os._exit: gloo's
    threads outlive destroy_process_group while anything (DDP does) still holds the group, and
    one that drops a tensor during interpreter shutdown aborts the process with "terminate
    called without an active exception" (pytorch/pytorch#190489; docs/training.md)."""
    if rank_and_world()[1] > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
