"""Typed training configuration: dataclasses ← YAML file or preset ← key=value overrides, then
`resolve` (the automatic None values) and `validate`; docs/training.md, Configuration. Fields
marked `resumable` may change when a run is resumed (they do not change what is learned)."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from greedygrow.atomic import atomic_write_text
from greedygrow.diffusion import (
    MIN_SNR_GAMMA,
    SCHEDULE_KINDS,
    SIGMOID_BIAS,
    WEIGHTINGS,
    schedule_for,
)
from greedygrow.fields import checked_fields
from greedygrow.model import CORE_PRESETS, SHELL_FAMILIES, CoreConfig, ShellConfig, shell_preset
from greedygrow.sampling import SAMPLERS

PRESETS_DIR = Path(__file__).parent / "configs"
GROW_MODES = ("greedy", "unfreeze", "joint", "scratch")
GROW_INITS = ("fresh", "preserve")  # docs/method.md, Growing
CORE_LOGSNRS = ("pixel", "token")
SOURCES = ("scenes", "folder", "webdataset")
DEVICES = ("auto", "cpu", "cuda")

DEFAULT_PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle and a yellow circle",
    "three purple circles",
]


class ConfigError(ValueError):
    """A configuration that cannot be used: says which key, what is wrong and what to do."""


RESUMABLE = {"resumable": True}


def resumable(default: Any) -> Any:
    """A field that may change when a run is resumed."""
    return field(default=default, metadata=RESUMABLE)


@dataclass
class ModelConfig:
    core: str = "cpu-small"  # a name in greedygrow.model.CORE_PRESETS
    core_overrides: dict[str, Any] = field(default_factory=dict)  # CoreConfig fields
    shell_family: str = "cpu"  # SHELL_FAMILIES name: shallow shell in phase 1, grown in phase 2
    shell_overrides: dict[str, Any] = field(default_factory=dict)  # ShellConfig fields
    resolution: int = 32  # training resolution R (the data is resized to it)
    gradient_checkpointing: bool = resumable(False)
    compile: bool = resumable(False)  # torch.compile each core block and shell ResBlock


@dataclass
class DataConfig:
    source: str = "scenes"  # scenes | folder | webdataset
    path: str | None = None  # folder root or shard pattern (not used by scenes)
    count: int = 100_000  # scenes only: size of the fixed set (before the min_native filter)
    # a weighted mixture [{source: scenes|folder, path, count, weight}]; when set, source, path
    # and count above are not used (docs/data.md, Mixtures)
    mixture: list[dict[str, Any]] = field(default_factory=list)
    min_native: int | None = None  # keep images with native side >= this; None: 0 / R (grow)
    caption_dropout: float = 0.1  # fraction of captions replaced by the null text
    workers: int = resumable(0)  # DataLoader worker processes per rank
    text_encoder: str = "minilm"  # minilm | hf:<name-or-path>
    text_max_length: int = 32
    text_cache_dir: str | None = resumable(None)  # None: RUN/text-cache
    text_table_mb: int = resumable(4096)  # largest text table on the device; 0: encode per step
    scene_cache_dir: str | None = resumable(None)  # scenes drawn once, uint8; None: RUN/scenes
    scene_cache_mb: int = resumable(4096)  # largest scene cache (N·(3R² + 8) B); 0: draw always


@dataclass
class DiffusionConfig:
    schedule: str | None = None  # cosine | shifted | interpolated; None: by resolution
    weighting: str = "v_mse"  # v_mse | sigmoid | min_snr
    multiscale: bool = False
    sigmoid_bias: float = SIGMOID_BIAS  # b of the sigmoid weighting sigmoid(b − λ)
    min_snr_gamma: float = MIN_SNR_GAMMA  # γ of min(SNR, γ)


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
    # the tracked EMA as a power function of this relative length (EDM2) instead of ema_decay
    ema_sigma_rel: float | None = None
    # relative lengths of the power-function EMA profiles kept for post-hoc EMA (`greedygrow
    # ema`; EDM2 keeps [0.05, 0.10]); []: none
    posthoc_ema: list[float] = field(default_factory=list)


@dataclass
class RunConfig:
    steps: int = resumable(1000)
    batch_size: int = 32  # global batch, split evenly over the processes
    log_every: int = resumable(10)  # metrics every N steps (0: only the last)
    sample_every: int = resumable(500)  # grids at these steps and at the last one; 0: none
    checkpoint_every: int = resumable(250)  # state + exports every N steps (0: only the last)
    keep: int = resumable(2)  # training states kept in RUN/state
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    device: str = resumable("auto")  # auto | cpu | cuda
    parallel: str = resumable("ddp")  # ddp | fsdp (under torchrun)
    sample_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_PROMPTS), metadata=RESUMABLE
    )
    sample_per_prompt: int = resumable(2)
    sample_steps: int = resumable(25)
    sample_sampler: str = resumable("dpmpp2m")
    sample_guidance: float | None = resumable(None)  # None: the paper's 1.75 / 4.0 (grown)
    progress: bool = resumable(True)  # tqdm progress bar on rank 0
    # a step whose gradient norm is not finite is skipped on the device; read at log steps:
    # skip (stop after nonfinite_patience such steps in a row) | stop (at the first)
    nonfinite: str = resumable("skip")
    nonfinite_patience: int = resumable(20)
    ema_snapshot_every: int = resumable(0)  # post-hoc EMA snapshots (RUN/ema); 0: at checkpoints


@dataclass
class GrowConfig:
    mode: str | None = None  # None: phase 1 (train-core); greedy | unfreeze | joint | scratch
    core: str | None = None  # phase-1 run folder (not used by scratch)
    freeze_steps: int | None = None  # steps the core stays frozen; None: from the mode
    init: str | None = None  # fresh | preserve (the phase-1 shell kept inside); None: from the mode
    core_logsnr: str | None = None  # pixel | token: the λ the core reads; None: from the mode
    freeze_inherited: bool = False  # grow.core a grown run: also freeze the shell levels it keeps

    def core_frozen_at(self, step: int) -> bool:
        """Whether the core is frozen at optimizer step `step` (0-based) of a validated config:
        greedy always, unfreeze while step < freeze_steps, the other modes never."""
        if self.mode == "unfreeze":
            return step < self.freeze_steps
        return self.mode == "greedy"


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


RESUMABLE_KEYS = frozenset(
    f"{section.name}.{f.name}"
    for section in dataclasses.fields(Config)
    for f in dataclasses.fields(getattr(Config(), section.name))
    if f.metadata.get("resumable")
)


# ---------------------------------------------------------------------------------------------
# loading


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


def config_path(config_file: str | Path) -> Path:
    """A YAML path, or the file of the preset of that name shipped in greedygrow/configs/."""
    path = Path(config_file)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{config_file}.yaml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {path} does not exist and is not a preset; presets: {names}")


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
        path = config_path(config_file)
        try:
            yaml = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        cfg = _merge(cfg, yaml, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. run.steps=100)"
            )
    cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line override")
    return OmegaConf.to_object(cfg)


def run_config(run: str | Path) -> Config:
    """The config.yaml of run folder `run`, not resolved; a relative grow.core in it is taken
    relative to `run` (as in a shipped model, greedygrow/shipped.py)."""
    cfg = load_config(Path(run) / "config.yaml")
    if cfg.grow.core and not Path(cfg.grow.core).is_absolute():
        cfg.grow.core = str(Path(run) / cfg.grow.core)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (YAML- and JSON-safe)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as YAML, atomically."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def config_diff(old: Config, new: Config, ignore: frozenset[str] = RESUMABLE_KEYS) -> list[str]:
    """Lines 'key: old -> new' for every key that differs, except those in `ignore`."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in ignore
    ]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys → values; `*_overrides` dicts stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and not name.endswith("_overrides"):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


# ---------------------------------------------------------------------------------------------
# the model a config names


def core_config(cfg: Config) -> CoreConfig:
    """The CoreConfig named by model.core with model.core_overrides applied."""
    if cfg.model.core not in CORE_PRESETS:
        raise ConfigError(
            f"model.core: unknown core preset '{cfg.model.core}'; "
            f"choose one of {sorted(CORE_PRESETS)} (see `greedygrow info`)"
        )
    try:
        fields = checked_fields(CoreConfig, cfg.model.core_overrides, "model.core_overrides")
        return dataclasses.replace(CORE_PRESETS[cfg.model.core], **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def shell_config(cfg: Config) -> ShellConfig:
    """The phase's shell (shallow for train-core, grown for grow) at model.resolution."""
    grid = core_config(cfg).grid
    kind = "shallow" if cfg.phase == "core" else "grown"
    family = cfg.model.shell_family
    try:
        overrides = checked_fields(ShellConfig, cfg.model.shell_overrides, "model.shell_overrides")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if kind == "grown" and cfg.grow.core and cfg.grow.mode != "scratch":
        overrides = {**_phase1_links(cfg), **overrides}
    try:
        return shell_preset(kind, cfg.model.resolution, family, grid, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"model.resolution={cfg.model.resolution} does not work with a {kind} shell of "
            f"family '{family}' around the core's {grid}×{grid} grid: {e}"
        ) from None


def _phase1_links(cfg: Config) -> dict[str, Any]:
    """A grown shell's ties to the run it grows (grow.core): with grow.init=preserve that run's
    shallow shell as `inner`; with grow.core_logsnr=token the λ shift 2 log(R/R₁), R₁ the
    resolution the core was trained at (docs/method.md, Growing)."""
    links: dict[str, Any] = {}
    if cfg.grow.init != "preserve" and cfg.grow.core_logsnr != "token":
        return links
    source = run_config(cfg.grow.core)
    if cfg.grow.init == "preserve":
        if source.phase != "core":
            raise ConfigError(
                f"grow.init=preserve keeps the shallow shell of a train-core run; {cfg.grow.core} "
                "is a grown run: use grow.init=fresh"
            )
        links["inner"] = shell_config(source)
    if cfg.grow.core_logsnr == "token":
        r1 = _core_resolution(source)
        # tokens average (R/G)² pixels, so their log-SNR is λ_R + 2 log(R/R₁) against phase 1's
        links["core_logsnr_shift"] = 2 * math.log(cfg.model.resolution / r1)
    return links


def _core_resolution(cfg: Config) -> int:
    """The resolution a run's core was trained at in phase 1 (followed through grown runs)."""
    if cfg.phase == "core" or cfg.grow.mode == "scratch":
        return cfg.model.resolution
    return _core_resolution(run_config(cfg.grow.core))


# ---------------------------------------------------------------------------------------------
# resolving and validating


def resolve(cfg: Config) -> Config:
    """Fill the automatic (None) values from the phase and resolution; returns a new Config."""
    cfg = copy.deepcopy(cfg)
    if cfg.diffusion.schedule is None and cfg.model.resolution > 0:
        cfg.diffusion.schedule = schedule_for(cfg.model.resolution).kind
    if cfg.data.min_native is None:  # phase 2 trains on the high-resolution subset (the paper)
        cfg.data.min_native = 0 if cfg.phase == "core" else cfg.model.resolution
    if cfg.run.sample_guidance is None:  # the paper's 1.75 (Shallow-UViT) and 4.0 (grown)
        cfg.run.sample_guidance = 1.75 if cfg.phase == "core" else 4.0
    if cfg.phase == "grow" and cfg.grow.freeze_steps is None:
        cfg.grow.freeze_steps = default_freeze_steps(cfg.grow.mode, cfg.run.steps)
    if cfg.phase == "grow":  # scratch has no phase-1 shell or resolution to start from
        scratch = cfg.grow.mode == "scratch"
        cfg.grow.init = cfg.grow.init or ("fresh" if scratch else DEFAULT_INIT)
        cfg.grow.core_logsnr = cfg.grow.core_logsnr or ("pixel" if scratch else DEFAULT_LOGSNR)
    return cfg


DEFAULT_INIT, DEFAULT_LOGSNR = "fresh", "pixel"  # measured: docs/method.md, Growing


def default_freeze_steps(mode: str, steps: int) -> int:
    """grow.freeze_steps when not given: greedy -1 (frozen for ever); unfreeze a quarter of the
    run (the paper's 500k of 2M steps); joint and scratch 0."""
    return {"greedy": -1, "unfreeze": steps // 4}.get(mode, 0)


SIGMA_REL_MAX = 12**-0.5  # a power-function EMA's longest relative length: γ = 0 (EDM2 §3)

CHOICES: dict[str, tuple] = {
    "model.shell_family": tuple(SHELL_FAMILIES),
    "data.source": SOURCES,
    "diffusion.schedule": (*SCHEDULE_KINDS, None),
    "diffusion.weighting": WEIGHTINGS,
    "optim.schedule": ("constant", "cosine"),
    "run.precision": ("fp32", "bf16"),
    "run.device": DEVICES,
    "run.parallel": ("ddp", "fsdp"),
    "run.nonfinite": ("skip", "stop"),
    "run.sample_sampler": SAMPLERS,
    "grow.mode": (*GROW_MODES, None),
    "grow.init": (*GROW_INITS, None),
    "grow.core_logsnr": (*CORE_LOGSNRS, None),
}


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Refuse a config that cannot train, naming the key and what to do. Builds no model."""
    for key, choices in CHOICES.items():
        if _value(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {_value(cfg, key)!r}")
    core = core_config(cfg)
    shell_config(cfg)
    problems = [
        *_range_problems(cfg),
        *_grow_problems(cfg.grow),
        *_mixture_problems(cfg.data.mixture),
    ]
    if not cfg.data.mixture and cfg.data.source != "scenes" and not cfg.data.path:
        problems.append(f"data.path is required for data.source={cfg.data.source}")
    if cfg.data.text_max_length > core.text_len:
        problems.append(
            f"data.text_max_length={cfg.data.text_max_length} exceeds the core's text_len="
            f"{core.text_len}; lower it or pick a core with a longer text_len"
        )
    if problems:
        raise ConfigError("; ".join(problems))


DATA_COUNTS = ("workers", "text_table_mb", "scene_cache_mb")


def _range_problems(cfg: Config) -> list[str]:
    """Numbers outside their ranges, as 'key must be ..., got ...'."""
    optim = cfg.optim
    betas_ok = len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas)
    rules = [
        ("model.resolution", cfg.model.resolution > 0, "positive"),
        ("data.caption_dropout", 0 <= cfg.data.caption_dropout < 1, "in [0, 1)"),
        *((f"data.{k}", getattr(cfg.data, k) >= 0, ">= 0") for k in DATA_COUNTS),
        ("optim.lr", optim.lr > 0, "positive"),
        ("optim.betas", betas_ok, "2 in [0, 1)"),
        ("optim.warmup_steps", optim.warmup_steps >= 0, ">= 0"),
        ("optim.grad_clip", optim.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("optim.core_lr_multiplier", optim.core_lr_multiplier >= 0, ">= 0"),
        ("optim.ema_decay", 0 <= optim.ema_decay < 1, "in [0, 1)"),
        ("run.steps", cfg.run.steps > 0, "positive"),
        ("run.batch_size", cfg.run.batch_size > 0, "positive"),
        ("run.keep", cfg.run.keep >= 1, ">= 1"),
        *((f"run.{k}", getattr(cfg.run, k) >= 0, ">= 0") for k in ("log_every", "sample_every")),
        ("run.checkpoint_every", cfg.run.checkpoint_every >= 0, ">= 0"),
        ("run.nonfinite_patience", cfg.run.nonfinite_patience >= 1, ">= 1"),
        ("run.ema_snapshot_every", cfg.run.ema_snapshot_every >= 0, ">= 0"),
        *(
            (key, all(0 < s < SIGMA_REL_MAX for s in values), f"in (0, {SIGMA_REL_MAX:.4f})")
            for key, values in (
                ("optim.ema_sigma_rel", [optim.ema_sigma_rel or 0.1]),
                ("optim.posthoc_ema", optim.posthoc_ema),
            )
        ),
    ]
    return [f"{key} must be {what}, got {_value(cfg, key)}" for key, ok, what in rules if not ok]


MIXTURE_KEYS = ("source", "path", "count", "weight")


def _mixture_problems(entries: list[dict[str, Any]]) -> list[str]:
    """What is wrong with each data.mixture entry, naming it by its index."""
    problems = []
    for k, entry in enumerate(entries):
        where = f"data.mixture[{k}]"
        if unknown := sorted(set(entry) - set(MIXTURE_KEYS)):
            problems.append(f"{where}: unknown keys {unknown}; known keys are {list(MIXTURE_KEYS)}")
        source, path, count = entry.get("source"), entry.get("path"), entry.get("count")
        weight = entry.get("weight", 1.0)
        if source == "webdataset":
            problems.append(
                f"{where}: webdataset shards cannot be mixed (a mixture draws items by index, a "
                "stream has none); unpack them into a folder, or train on them alone with "
                "data.source=webdataset"
            )
        elif source not in ("scenes", "folder"):
            problems.append(f"{where}.source must be scenes or folder, got {source!r}")
        elif source == "folder" and not path:
            problems.append(f"{where}.path is required for a folder: its root directory")
        elif source == "scenes" and path:
            problems.append(
                f"{where}: scenes are generated and take no path (got {path!r}); to read scenes "
                "written with `greedygrow scenes`, use source folder"
            )
        if source == "scenes" and count is None:
            problems.append(f"{where}.count is required for scenes: the size of the fixed set")
        if count is not None and (type(count) is not int or count < 1):
            problems.append(f"{where}.count must be a positive integer, got {count!r}")
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (number and math.isfinite(weight) and weight > 0):
            problems.append(f"{where}.weight must be a number > 0, got {weight!r}")
    return problems


def _grow_problems(grow: GrowConfig) -> list[str]:
    """The grow-mode rules: which modes need a phase-1 core, and which freeze_steps fit."""
    mode, steps = grow.mode, grow.freeze_steps
    if mode is None and (grow.init or grow.core_logsnr):
        return ["grow.init and grow.core_logsnr apply to `greedygrow grow` runs only"]
    if grow.freeze_inherited and (
        mode in (None, "scratch") or not grow.core or run_config(grow.core).phase != "grow"
    ):
        return [
            "grow.freeze_inherited freezes the shell levels kept from a grown run: it needs "
            "`greedygrow grow --core GROWN_RUN` in a mode other than scratch, got "
            f"mode={mode}, core={grow.core}; drop it, or grow from a grown run"
        ]
    if mode == "scratch" and (grow.init == "preserve" or grow.core_logsnr == "token"):
        return [
            "grow.init=preserve and grow.core_logsnr=token start from a phase-1 run; "
            "--mode scratch has none (use fresh and pixel)"
        ]
    if mode in ("greedy", "unfreeze", "joint") and not grow.core:
        return [f"grow.core: --mode {mode} needs a phase-1 run folder (--core RUN)"]
    if mode == "greedy" and steps not in (None, -1):
        return [
            "grow.freeze_steps: greedy keeps the core frozen for ever (-1); "
            "use --mode unfreeze to unfreeze it after N steps"
        ]
    if mode == "unfreeze" and steps is not None and steps < 0:
        return [f"grow.freeze_steps must be >= 0 for --mode unfreeze, got {steps}"]
    if mode in ("joint", "scratch") and steps not in (None, 0):
        return [
            f"grow.freeze_steps: --mode {mode} trains the core from step 0; "
            "use --mode unfreeze for a frozen warm-up"
        ]
    return []


# ---------------------------------------------------------------------------------------------
# the two phases' configs


def train_core_config(config_file: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Phase 1's config: defaults ← YAML ← key=value; resolved and validated."""
    cfg = resolve(load_config(config_file, overrides))
    if cfg.phase != "core":
        raise ConfigError("grow.mode is set: phase 2 runs with `greedygrow grow`, not train-core")
    validate(cfg)
    return cfg


INHERITED_KEYS = ("model.core", "model.core_overrides", "data.text_encoder", "data.text_max_length")


def grow_config(
    core: str | None,
    resolution: int,
    mode: str,
    freeze_steps: int | None = None,
    config_file: str | None = None,
    overrides: list[str] | tuple = (),
) -> Config:
    """Phase 2's config: the core's preset and text encoder from the phase-1 run ← YAML ←
    key=value (model.core_overrides field by field) ← the --resolution/--mode/--freeze-steps
    flags."""
    inherited: dict = {}
    flags = [f"model.resolution={resolution}", f"grow.mode={mode}"]
    if core is not None:
        source = Path(core) / "config.yaml"
        if not source.is_file():
            raise ConfigError(
                f"--core {core}: no config.yaml there; point --core at a "
                "phase-1 run folder written by `greedygrow train-core`"
            )
        phase1 = run_config(core)
        for key in INHERITED_KEYS:
            section, name = key.split(".")
            inherited.setdefault(section, {})[name] = _value(phase1, key)
        flags.append(f"grow.core={Path(core).resolve()}")
    if freeze_steps is not None:
        flags.append(f"grow.freeze_steps={freeze_steps}")
    cfg = resolve(load_config(config_file, [*overrides, *flags], base=inherited))
    validate(cfg)
    return cfg
