"""Typed training configuration: dataclasses, YAML presets in configs/, key=value overrides.

A run's configuration is `Config` (sections model, data, diffusion, optim, run, grow). It is
built from the dataclass defaults, then a YAML file, then `key=value` overrides (OmegaConf
structured configs in struct mode, so an unknown key is refused), then `resolve` fills every
"auto" value (None) from the phase and resolution, and `validate` refuses anything that cannot
train — all before any work starts. The resolved config is what RUN/config.yaml holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from greedygrow.diffusion import SCHEDULE_KINDS as SCHEDULES
from greedygrow.diffusion import WEIGHTINGS, schedule_for
from greedygrow.model import CORE_PRESETS, SHELL_FAMILIES, CoreConfig, ShellConfig, shell_preset

GROW_MODES = ("greedy", "unfreeze", "joint", "scratch")
SOURCES = ("scenes", "folder", "webdataset")

DEFAULT_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle and a yellow circle",
    "three purple circles",
]


class ConfigError(ValueError):
    """A configuration that cannot be used: says which key, what is wrong and what to do."""


@dataclass
class ModelConfig:
    core: str = "cpu-small"  # a name in greedygrow.model.CORE_PRESETS
    core_overrides: dict[str, Any] = field(default_factory=dict)  # CoreConfig fields
    shell_family: str = "cpu"  # SHELL_FAMILIES name: shallow shell in phase 1, grown in phase 2
    shell_overrides: dict[str, Any] = field(default_factory=dict)  # ShellConfig fields
    resolution: int = 32  # training resolution R (the data is resized to it)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model


@dataclass
class DataConfig:
    source: str = "scenes"  # scenes | folder | webdataset
    path: str | None = None  # folder root or shard pattern (not used by scenes)
    count: int = 100_000  # scenes only: size of the fixed set (before the min_native filter)
    min_native: int | None = None  # keep images with native side >= this; None: 0 / R (grow)
    caption_dropout: float = 0.1  # fraction of captions replaced by the null text
    workers: int = 0  # DataLoader worker processes per rank
    text_encoder: str = "minilm"  # minilm | hf:<name-or-path>
    text_max_length: int = 32
    text_cache_dir: str | None = None  # None: RUN/text-cache


@dataclass
class DiffusionConfig:
    schedule: str | None = None  # cosine | shifted | interpolated; None: by resolution
    weighting: str = "v_mse"  # v_mse | sigmoid | min_snr
    multiscale: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine (to final_lr_fraction · lr)
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    core_lr_multiplier: float = 1.0  # the phase-1 core's lr = lr · this (unfreeze, joint)
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))


@dataclass
class RunConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch, split evenly over the processes
    log_every: int = 10  # metrics every N steps (0: only the last)
    sample_every: int = 500  # grids at these steps and at the last one; 0: no grids
    checkpoint_every: int = 250  # training state + exports every N steps (0: only the last)
    keep: int = 2  # training states kept in RUN/state
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_per_prompt: int = 2
    sample_steps: int = 25
    sample_sampler: str = "dpmpp2m"
    sample_guidance: float | None = None  # None: the paper's 1.75 (core) / 4.0 (grown)
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class GrowConfig:
    mode: str | None = None  # None: phase 1 (train-core); greedy | unfreeze | joint | scratch
    core: str | None = None  # phase-1 run folder (not used by scratch)
    freeze_steps: int | None = None  # steps the core stays frozen; None: from the mode


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)

    @property
    def phase(self) -> str:
        """ "core" (phase 1, Shallow-UViT) or "grow" (phase 2)."""
        return "core" if self.grow.mode is None else "grow"


# Keys that may change when a run is resumed (they do not change what is learned).
RESUMABLE_KEYS = frozenset(
    {
        "run.steps",
        "run.log_every",
        "run.sample_every",
        "run.checkpoint_every",
        "run.keep",
        "run.progress",
        "run.device",
        "run.parallel",
        "data.workers",
        "data.text_cache_dir",
        "model.compile",
        "model.gradient_checkpointing",
        "run.sample_prompts",
        "run.sample_per_prompt",
        "run.sample_steps",
        "run.sample_sampler",
        "run.sample_guidance",
    }
)


def _schema() -> Any:
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.model.core_overrides, False)
    OmegaConf.set_struct(schema.model.shell_overrides, False)
    return schema


def _merge(base: Any, other: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(node.keys()) if hasattr(node, "keys") else ""
        msg = str(e).splitlines()[0]
        hint = f" Valid keys under '{parent or '<top>'}': {valid}." if valid else ""
        raise ConfigError(f"{where}: bad config key '{key}': {msg}.{hint}") from None


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict | None = None,
) -> Config:
    """Defaults ← `base` (a dict) ← YAML `config_file` ← `key=value` overrides; not resolved.

    Raises ConfigError for an unknown key, a value of the wrong type, or a missing file.
    """
    cfg = _schema()
    if base is not None:
        cfg = _merge(cfg, OmegaConf.create(base), "base config")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for presets)")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. run.steps=100)"
            )
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line override")
    return OmegaConf.to_object(cfg)


def user_keys(config_file: str | Path | None, overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The dotted keys the user set explicitly in `config_file` and `overrides`."""
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            keys.add(name)
            if isinstance(v, dict):
                walk(v, name + ".")

    if config_file is not None and Path(config_file).is_file():
        walk(OmegaConf.to_container(OmegaConf.load(config_file)) or {}, "")
    walk(OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))), "")
    return keys


def core_config(cfg: Config) -> CoreConfig:
    """The CoreConfig named by model.core with model.core_overrides applied."""
    if cfg.model.core not in CORE_PRESETS:
        raise ConfigError(
            f"model.core: unknown core preset '{cfg.model.core}'; "
            f"choose one of {sorted(CORE_PRESETS)} (see `greedygrow info`)"
        )
    return _replace(CORE_PRESETS[cfg.model.core], cfg.model.core_overrides, "model.core_overrides")


def shell_config(cfg: Config) -> ShellConfig:
    """The phase's shell (shallow for train-core, grown for grow) at model.resolution."""
    grid = core_config(cfg).grid
    kind = "shallow" if cfg.phase == "core" else "grown"
    family = cfg.model.shell_family
    if family not in SHELL_FAMILIES:
        raise ConfigError(
            f"model.shell_family: unknown shell family '{family}'; "
            f"choose one of {sorted(SHELL_FAMILIES)}"
        )
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.shell_overrides.items()
    }
    names = {f.name for f in dataclasses.fields(ShellConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"model.shell_overrides: unknown field(s) {unknown}; valid fields: {sorted(names)}"
        )
    try:
        return shell_preset(kind, cfg.model.resolution, family, grid, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model.resolution={cfg.model.resolution} does not work with a {kind} shell of "
            f"family '{family}' around the core's {grid}×{grid} grid: {e}"
        ) from None


def _replace(base: Any, overrides: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve(cfg: Config) -> Config:
    """Fill the automatic (None) values from the phase and resolution; returns a new Config."""
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data),
        grow=dataclasses.replace(cfg.grow),
        run=dataclasses.replace(cfg.run),
        diffusion=dataclasses.replace(cfg.diffusion),
    )
    if cfg.diffusion.schedule is None and cfg.model.resolution > 0:
        # the schedule shift follows the resolution (DESIGN: Diffusion; Hoogeboom et al. 2023)
        cfg.diffusion.schedule = schedule_for(cfg.model.resolution).kind
    if cfg.data.min_native is None:
        # The grown model trains on the high-resolution subset (DESIGN: Phase 2).
        cfg.data.min_native = 0 if cfg.phase == "core" else cfg.model.resolution
    if cfg.run.sample_guidance is None:
        # the paper's guidance weights: 1.75 for Shallow-UViT, 4.0 for grown UViTs
        cfg.run.sample_guidance = 1.75 if cfg.phase == "core" else 4.0
    if cfg.phase == "grow" and cfg.grow.freeze_steps is None:
        cfg.grow.freeze_steps = default_freeze_steps(cfg.grow.mode, cfg.run.steps)
    return cfg


def default_freeze_steps(mode: str, steps: int) -> int:
    """grow.freeze_steps when not given: greedy -1 (frozen for ever); unfreeze a quarter of the
    run (the paper's 500k of 2M steps); joint and scratch 0."""
    return {"greedy": -1, "unfreeze": steps // 4}.get(mode, 0)


def validate(cfg: Config) -> None:
    """Refuse a config that cannot train, naming the key and what to do. Builds no model."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    core = core_config(cfg)
    shell_config(cfg)
    m, d, o, r, g = cfg.model, cfg.data, cfg.optim, cfg.run, cfg.grow
    need(m.resolution > 0, f"model.resolution must be positive, got {m.resolution}")
    need(d.source in SOURCES, f"data.source must be one of {SOURCES}, got '{d.source}'")
    need(
        d.source == "scenes" or bool(d.path),
        f"data.path is required for data.source={d.source} (a folder or a shard pattern)",
    )
    need(
        0.0 <= d.caption_dropout < 1.0,
        f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}",
    )
    need(d.workers >= 0, f"data.workers must be >= 0, got {d.workers}")
    text_len = getattr(core, "text_len", None)
    need(
        text_len is None or d.text_max_length <= text_len,
        f"data.text_max_length={d.text_max_length} exceeds the core's text_len={text_len}; "
        "lower it or pick a core with a longer text_len",
    )
    need(
        cfg.diffusion.schedule is None or cfg.diffusion.schedule in SCHEDULES,
        f"diffusion.schedule must be one of {SCHEDULES} or null, got '{cfg.diffusion.schedule}'",
    )
    need(
        cfg.diffusion.weighting in WEIGHTINGS,
        f"diffusion.weighting must be one of {WEIGHTINGS}, got '{cfg.diffusion.weighting}'",
    )
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    need(
        o.schedule in ("constant", "cosine"),
        f"optim.schedule must be constant or cosine, got '{o.schedule}'",
    )
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {o.grad_clip}")
    need(
        o.core_lr_multiplier >= 0,
        f"optim.core_lr_multiplier must be >= 0, got {o.core_lr_multiplier}",
    )
    need(0 <= o.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    need(
        r.steps > 0 and r.batch_size > 0,
        f"run.steps and run.batch_size must be positive, got {r.steps}, {r.batch_size}",
    )
    for key in ("log_every", "sample_every", "checkpoint_every"):
        need(getattr(r, key) >= 0, f"run.{key} must be >= 0, got {getattr(r, key)}")
    need(r.keep >= 1, f"run.keep must be >= 1, got {r.keep}")
    need(
        r.precision in ("fp32", "bf16"), f"run.precision must be fp32 or bf16, got '{r.precision}'"
    )
    need(
        r.device in ("auto", "cpu", "cuda"),
        f"run.device must be auto, cpu or cuda, got '{r.device}'",
    )
    need(r.parallel in ("ddp", "fsdp"), f"run.parallel must be ddp or fsdp, got '{r.parallel}'")
    need(
        r.sample_sampler in ("ddim", "ancestral", "dpmpp2m"),
        f"run.sample_sampler must be ddim, ancestral or dpmpp2m, got '{r.sample_sampler}'",
    )
    need(
        g.mode is None or g.mode in GROW_MODES,
        f"grow.mode must be one of {GROW_MODES} (or null for train-core), got '{g.mode}'",
    )
    if g.mode in ("greedy", "unfreeze", "joint"):
        need(bool(g.core), f"grow.core: --mode {g.mode} needs a phase-1 run folder (--core RUN)")
    if g.mode == "greedy":
        need(
            g.freeze_steps in (None, -1),
            "grow.freeze_steps: greedy keeps the core frozen for ever (-1); "
            "use --mode unfreeze to unfreeze it after N steps",
        )
    if g.mode == "unfreeze":
        need(
            g.freeze_steps is None or g.freeze_steps >= 0,
            f"grow.freeze_steps must be >= 0 for --mode unfreeze, got {g.freeze_steps}",
        )
    if g.mode in ("joint", "scratch"):
        need(
            g.freeze_steps in (None, 0),
            f"grow.freeze_steps: --mode {g.mode} trains the core from step 0; "
            "use --mode unfreeze for a frozen warm-up",
        )


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (YAML- and JSON-safe)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as YAML (atomically: temporary file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)


def read_config(path: str | Path) -> Config:
    """Load a RUN/config.yaml written by `save_config` (refuses unknown keys)."""
    return load_config(config_file=path)


def config_diff(old: Config, new: Config, ignore: frozenset[str] = RESUMABLE_KEYS) -> list[str]:
    """Lines 'key: old -> new' for every key that differs, except those in `ignore`."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in ignore
    ]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and not name.endswith("_overrides"):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out
