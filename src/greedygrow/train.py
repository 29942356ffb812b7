"""The training loop for both phases of greedy growing, single process or under torchrun.

`train(cfg, out)` runs phase 1 (train-core: a Shallow-UViT at low resolution on all the data)
or phase 2 (grow: a grown shell around a phase-1 core at resolution R, on the high-resolution
subset, in mode greedy | unfreeze | joint | scratch), and resumes from the run folder's latest
state when run again on it.

Determinism: every random draw of a training step (caption drop, t, noise) comes from a
generator seeded by (seed, step, global sample index), and the data order is a function of
(seed, global sample position). So a resumed run equals an uninterrupted one, and N processes
with a global batch B equal one process with B — no RNG state has to be carried across a
restart or a change of world size. (Dropout, if enabled in the shell, draws from the global
RNG, reseeded per (seed, step, rank).)
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Sampler

from greedygrow.atomic import atomic_write_text
from greedygrow.checkpoint import export_model, load_latest_state, save_state
from greedygrow.config import (
    Config,
    ConfigError,
    config_diff,
    core_config,
    default_freeze_steps,
    load_config,
    read_config,
    resolve,
    save_config,
    shell_config,
    to_dict,
    user_keys,
    validate,
)
from greedygrow.data import WebDatasetStream, make_dataset
from greedygrow.diffusion import Schedule, schedule_for, training_loss
from greedygrow.grow import core_is_frozen, grow, set_core_frozen
from greedygrow.model import UViT
from greedygrow.sample import sample_grid
from greedygrow.text import CachedTextEncoder, shared_text_encoder

log = logging.getLogger(__name__)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# rank 0 holds a full state dict, the others an empty one; each rank keeps its own shards
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, out: str | Path) -> Path:
    """Train (or resume) the run in folder `out`; returns it. Works under torchrun."""
    cfg = resolve(cfg)
    validate(cfg)
    env = init_distributed(cfg.run.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, Path(out), env)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if env.world > 1:
            dist.destroy_process_group()


def _train(cfg: Config, run: Path, env: Env) -> Path:
    _check_resume(cfg, run)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r = cfg.run
    if r.batch_size % env.world:
        raise ConfigError(
            f"run.batch_size={r.batch_size} (global) is not divisible by the "
            f"{env.world} processes; pick a multiple of {env.world}"
        )
    local_batch = r.batch_size // env.world
    schedule = schedule_for(cfg.model.resolution, cfg.diffusion.schedule)
    encoder = CachedTextEncoder(
        shared_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, str(env.device)),
        cfg.data.text_cache_dir or run / "text-cache",
    )
    fsdp = _uses_fsdp(cfg, env)
    resumed = load_latest_state(run) if env.main or not fsdp else None  # FSDP2: rank 0 reads
    step, state = resumed if resumed is not None else (0, None)
    if fsdp:
        step = _broadcast_int(step)
    if env.main and step:
        log.info("resuming %s from step %d", run, step)
    t = Trainable(cfg, env, step, state)  # a core that does not fit is refused here
    del state
    _write_config(cfg, run, env)
    batches = _batches(cfg, env, step, local_batch)
    logger = _Logger(cfg, run, env, step) if env.main else None
    pending_loss, pending_n, busy = torch.zeros((), device=env.device), 0, 0.0
    while step < r.steps:
        t.set_frozen(_core_frozen_at(cfg, step))
        tic = time.perf_counter()
        batch = next(batches)
        lr = _set_lr(t.optimizer, cfg, step)
        loss, grad_norm = t.step(batch, encoder, schedule, step, local_batch)
        t.update_ema(_ema_decay(cfg, step))
        step += 1
        pending_loss += loss.detach()
        pending_n += 1
        busy += time.perf_counter() - tic
        if (r.log_every and step % r.log_every == 0) or step == r.steps:
            mean_loss = _all_mean(pending_loss / pending_n, env)
            if logger is not None:
                logger.log(
                    step,
                    {
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "images_per_s": pending_n * r.batch_size / busy,
                        "core_frozen": t.frozen,
                    },
                )
            pending_loss, pending_n, busy = torch.zeros((), device=env.device), 0, 0.0
        if (r.checkpoint_every and step % r.checkpoint_every == 0) or step == r.steps:
            _checkpoint(cfg, run, env, t, step, schedule)
        sample_now = r.sample_every and (step % r.sample_every == 0 or step == r.steps)
        if sample_now and (env.main or t.fsdp):  # a sharded EMA samples on every rank
            grid = sample_grid(
                t.ema,
                encoder,
                schedule,
                r.sample_prompts,
                r.sample_per_prompt,
                r.sample_steps,
                r.sample_sampler,
                r.sample_guidance,
                r.seed,
                env.device,
                bf16=cfg.run.precision == "bf16",
            )
            if t.fsdp:
                t.ema.reshard()  # FSDP2 keeps the root unsharded after a forward without backward
            if logger is not None:
                logger.grid(step, grid)
    if logger is not None:
        logger.close()
    return run


def train_core_config(config_file: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Phase 1's config: defaults ← YAML ← key=value; resolved and validated."""
    cfg = resolve(load_config(config_file, overrides))
    if cfg.phase != "core":
        raise ConfigError("grow.mode is set: phase 2 runs with `greedygrow grow`, not train-core")
    validate(cfg)
    return cfg


def grow_config(
    core: str | None,
    resolution: int,
    mode: str,
    freeze_steps: int | None = None,
    config_file: str | None = None,
    overrides: list[str] | tuple = (),
) -> Config:
    """Phase 2's config. The core's preset and text encoder come from the phase-1 run unless
    set explicitly; then YAML ← key=value ← the --resolution/--mode/--freeze-steps flags."""
    inherited: dict = {}
    if core is not None:
        source = Path(core) / "config.yaml"
        if not source.is_file():
            raise ConfigError(
                f"--core {core}: no config.yaml there; point --core at a "
                "phase-1 run folder written by `greedygrow train-core`"
            )
        phase1 = read_config(source)
        user = user_keys(config_file, overrides)
        for key in (
            "model.core",
            "model.core_overrides",
            "data.text_encoder",
            "data.text_max_length",
        ):
            if key not in user:
                section, name = key.split(".")
                value = getattr(getattr(phase1, section), name)
                inherited.setdefault(section, {})[name] = value
    flags = [f"model.resolution={resolution}", f"grow.mode={mode}"]
    if core is not None:
        flags.append(f"grow.core={Path(core).resolve()}")
    if freeze_steps is not None:
        flags.append(f"grow.freeze_steps={freeze_steps}")
    cfg = resolve(load_config(config_file, [*overrides, *flags], base=inherited))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class Env:
    """Where this process runs: rank, world size and device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Env:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but CUDA is not available; use run.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Env(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Env(dist.get_rank(), dist.get_world_size(), dev)


def _all_mean(x: Tensor, env: Env) -> float:
    if env.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= env.world
    return float(x)


def _broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _uses_fsdp(cfg: Config, env: Env) -> bool:
    return cfg.run.parallel == "fsdp" and env.world > 1


def _barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# model, EMA, optimizer


def _core_frozen_at(cfg: Config, step: int) -> bool:
    return cfg.phase == "grow" and core_is_frozen(step, cfg.grow.mode, cfg.grow.freeze_steps)


class Trainable:
    """The model being trained, its EMA, its optimizer, and how it is wrapped (DDP/FSDP2)."""

    def __init__(self, cfg: Config, env: Env, step: int, state: dict | None) -> None:
        """`state`: the full training state to resume from at `step` > 0. Under FSDP2 only rank
        0 has it (the others pass None) and every rank receives its shards by broadcast."""
        self.cfg, self.env = cfg, env
        self.core_cfg, self.shell_cfg = core_config(cfg), shell_config(cfg)
        self.fsdp = _uses_fsdp(cfg, env)
        # Under FSDP2 only rank 0 materialises initial weights (on CPU); the other ranks, and
        # every rank of a resumed run, build shapes on the meta device: no GPU holds the full model
        real = not self.fsdp or (env.main and step == 0)
        torch.manual_seed(cfg.run.seed)  # the same initialisation on every rank
        with torch.device("cpu" if real else "meta"):
            if real and step == 0 and cfg.phase == "grow":
                source = None if cfg.grow.mode == "scratch" else cfg.grow.core
                model = grow(source, self.core_cfg, self.shell_cfg, cfg.grow.mode)
            else:
                model = UViT(self.core_cfg, self.shell_cfg)
        initial = model.state_dict() if self.fsdp and real else {}  # what rank 0 broadcasts
        if self.fsdp:  # every rank shards shapes alike; weights arrive by broadcast
            with torch.device("meta"):
                model = UViT(self.core_cfg, self.shell_cfg)
                self.ema = UViT(self.core_cfg, self.shell_cfg).requires_grad_(False).eval()
        model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
        self.frozen = _core_frozen_at(cfg, step)
        if cfg.phase == "grow":
            set_core_frozen(model, self.frozen)
        self.model = model.train()
        if self.fsdp:
            _shard(self.model, bf16=cfg.run.precision == "bf16")
            _shard(self.ema, bf16=False)
            self.model.to_empty(device=env.device)
            self.ema.to_empty(device=env.device)
            if step == 0:
                for target in (self.model, self.ema):  # (the loader rewrites the dict it gets)
                    set_model_state_dict(target, dict(initial), options=FROM_RANK0)
            del initial
        else:
            model.to(env.device)
            self.ema = _copy_model(model, self.core_cfg, self.shell_cfg).requires_grad_(False)
            self.ema.eval()
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, cfg, core=not self.frozen),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        if step > 0:
            state = state or {"model": {}, "optimizer": {}, "ema": {}}  # FSDP2, rank > 0
            options = FROM_RANK0 if self.fsdp else FULL
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=options
            )
            set_model_state_dict(self.ema, state["ema"], options=options)
        self._wrap()

    def _wrap(self) -> None:
        forward: nn.Module = self.model
        if self.env.world > 1 and not self.fsdp:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(forward) if self.cfg.model.compile else forward

    def set_frozen(self, frozen: bool) -> None:
        """Switch the core between frozen and trained (unfreeze mode), in place."""
        if frozen == self.frozen:
            return
        if frozen:
            raise RuntimeError("a trained core is never frozen again")
        set_core_frozen(self.model, False)
        for group in _param_groups(self.model, self.cfg, core=True, shell=False):
            self.optimizer.add_param_group(group)
        self.frozen = False
        # DDP registers only the parameters that require grad at construction: wrap anew, after
        # the old wrapper (and its gradient hooks, and any graph compiled around it) is gone
        self.forward = self.model
        if self.cfg.model.compile:
            torch._dynamo.reset()
        gc.collect()
        _barrier(self.env)
        self._wrap()

    def step(
        self, batch: dict, encoder, schedule: Schedule, step: int, local_batch: int
    ) -> tuple[Tensor, Tensor]:
        """One optimizer step on this rank's share of the global batch; (loss, grad norm)."""
        cfg, env = self.cfg, self.env
        x = batch["image"].to(env.device, non_blocking=True)
        text = encoder.encode(list(batch["caption"])).to(env.device)
        first = step * cfg.run.batch_size + env.rank * local_batch
        drop, t, noise = _step_randomness(cfg, step, first, x)
        torch.manual_seed(_mix(cfg.run.seed, step, env.rank, 1))  # dropout, if any
        bf16 = cfg.run.precision == "bf16"

        def denoise(z: Tensor, logsnr: Tensor) -> Tensor:
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
                return self.forward(z, logsnr, text.tokens, text.mask, text.pooled, drop_text=drop)

        loss = training_loss(
            denoise,
            x,
            schedule,
            cfg.diffusion.weighting,
            cfg.diffusion.multiscale,
            t=t,
            noise=noise,
        ).mean()
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = _clip(params, cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema ← ema + (1 − decay)(θ − ema) for trained θ; a frozen core's EMA already equals it."""
        pairs = [
            (_local(e), _local(p))
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True)
            if p.requires_grad
        ]
        if pairs:
            ema, cur = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(ema), list(cur), 1.0 - decay)

    def full_state(self) -> dict:
        """Full (unsharded) CPU state dicts of model, EMA and optimizer; collective."""
        model, optim = get_state_dict(self.model, self.optimizer, options=FULL)
        return {"model": model, "optimizer": optim, "ema": self.full_ema()}

    def full_ema(self) -> dict[str, Tensor]:
        """The EMA weights as a full CPU state dict (rank 0; empty elsewhere); collective."""
        return get_model_state_dict(self.ema, options=FULL)


def _copy_model(model: UViT, core_cfg, shell_cfg) -> UViT:
    copy = UViT(core_cfg, shell_cfg).to(next(model.parameters()).device)
    copy.load_state_dict(model.state_dict())
    return copy


def _shard(model: UViT, bf16: bool) -> None:
    """FSDP2: one unit per core block, one for the rest. With bf16, parameters are gathered
    and used in bf16 (half the all-gather traffic) while the sharded master weights, the
    optimizer and the gradient reduce-scatter stay fp32 (as torchtitan does). Inputs are not
    cast: autocast (always on with bf16) picks each op's dtype, so the core's residual stream
    stays fp32 as under DDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    for block in model.core.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _param_groups(model: UViT, cfg: Config, core: bool, shell: bool = True) -> list[dict]:
    """AdamW groups: shell then core, each split into decayed (matrices) and not (the rest)."""
    core_ids = {id(p) for p in model.core.parameters()}
    # the multiplier slows a phase-1 core that goes on training; a core being learned (phase 1,
    # scratch) trains at the shell's rate
    trained_on = cfg.phase == "grow" and cfg.grow.mode in ("unfreeze", "joint")
    core_mult = cfg.optim.core_lr_multiplier if trained_on else 1.0
    groups = []
    for name, wanted, mult in (("shell", shell, 1.0), ("core", core, core_mult)):
        if not wanted:
            continue
        params = [p for p in model.parameters() if (id(p) in core_ids) == (name == "core")]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "name": name,
                        "lr_mult": mult,
                        "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                    }
                )
    return groups


def _set_lr(optimizer: torch.optim.Optimizer, cfg: Config, step: int) -> float:
    """Set every group's lr for `step`; returns the base lr."""
    lr = lr_at(cfg, step)
    core_start = max(cfg.grow.freeze_steps or 0, 0) if cfg.phase == "grow" else 0
    core_lr = lr_at(cfg, step, start=core_start)
    for g in optimizer.param_groups:
        g["lr"] = (core_lr if g["name"] == "core" else lr) * g["lr_mult"]
    return lr


def lr_at(cfg: Config, step: int, start: int = 0) -> float:
    """Learning rate at `step`: linear warm-up from `start`, then constant or cosine."""
    o = cfg.optim
    # warm-up: lr · min(1, (n + 1) / W), n steps since `start` (the core's own warm-up when it
    # is unfrozen at `start`)
    warm = min(1.0, (step - start + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    if o.schedule == "constant":
        return o.lr * warm
    total = max(cfg.run.steps - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / total, 1.0)
    # cosine: f + (1 − f) · ½ (1 + cos(π p)), p the fraction of post-warm-up steps done
    f = o.final_lr_fraction
    return o.lr * warm * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ema_decay(cfg: Config, step: int) -> float:
    # decay_n = min(decay, (1 + n) / (10 + n))  (TF ExponentialMovingAverage num_updates)
    d = cfg.optim.ema_decay
    return min(d, (1 + step) / (10 + step)) if cfg.optim.ema_warmup else d


def _clip(params: list[Tensor], max_norm: float) -> Tensor:
    """Clip to max_norm (0: no clipping); the total norm, left on the device (no sync)."""
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---------------------------------------------------------------------------------------------
# randomness and data


def _mix(*values: int) -> int:
    """A 63-bit seed mixing integers (splitmix64 finaliser over a running hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _step_randomness(
    cfg: Config, step: int, first: int, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Caption-drop flags [b], t [b] and noise like x, sample i seeded by (seed, step, first+i)."""
    drops, ts, noises = [], [], []
    for i in range(x.shape[0]):
        g = torch.Generator(x.device).manual_seed(_mix(cfg.run.seed, step, first + i))
        u = torch.rand(2, generator=g, device=x.device, dtype=torch.float64)
        drops.append(u[0] < cfg.data.caption_dropout)
        ts.append(u[1])
        noises.append(torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype))
    return torch.stack(drops), torch.stack(ts), torch.stack(noises)


class StepSampler(Sampler[list[int]]):
    """This rank's indices for each step from `start`: global position p = step·B + j reads
    index perm_e[p mod N], perm_e a permutation seeded by (seed, epoch e = p // N)."""

    def __init__(
        self, n: int, global_batch: int, rank: int, world: int, seed: int, start: int
    ) -> None:
        self.n, self.b, self.seed = n, global_batch, seed
        self.local = global_batch // world
        self.offset = rank * self.local
        self.start = start
        self._perm: tuple[int, Tensor] | None = None

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 2))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][p % self.n])

    def __iter__(self) -> Iterator[list[int]]:
        # endless: a batch that fails to decode entirely is passed over (`_skip_empty`)
        for s in itertools.count(self.start):
            base = s * self.b + self.offset
            yield [self._index(base + j) for j in range(self.local)]


def _batches(cfg: Config, env: Env, start: int, local_batch: int) -> Iterator[dict]:
    d = cfg.data
    dataset = make_dataset(
        d.source,
        d.path,
        cfg.model.resolution,
        train=True,
        min_native=d.min_native,
        seed=cfg.run.seed,
        count=d.count if d.source == "scenes" else None,
    )
    kw = {
        "num_workers": d.workers,
        "pin_memory": env.device.type == "cuda",
        "persistent_workers": d.workers > 0,
    }
    if isinstance(dataset, WebDatasetStream):
        # The endless resampled stream splits itself over ranks and workers; a resumed run
        # continues with a fresh stream seeded by the step (nothing to replay).
        dataset.set_epoch(start)
        return iter(DataLoader(dataset, batch_size=local_batch, **kw))
    if len(dataset) == 0:
        raise ConfigError(f"data set {d.source}:{d.path} is empty at min_native={d.min_native}")
    sampler = StepSampler(
        len(dataset), cfg.run.batch_size, env.rank, env.world, cfg.run.seed, start
    )
    collate = getattr(dataset, "collate_fn", None)  # drops images that fail to decode
    return _skip_empty(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **kw)))


def _skip_empty(batches: Iterator[dict | None]) -> Iterator[dict]:
    """Pass over batches none of whose images decoded (the data set counts and warns)."""
    for batch in batches:
        if batch is not None:
            yield batch


# ---------------------------------------------------------------------------------------------
# run folder: config, checkpoints, logs, sample grids


def _check_resume(cfg: Config, run: Path) -> None:
    """Refuse to resume a run folder whose config differs in a key that matters. The run's
    unfreeze step is kept when the new one is only the default (a quarter of `run.steps`, which
    may have grown), and stretching a cosine learning-rate schedule is warned about."""
    path = run / "config.yaml"
    if path.is_file():
        old = read_config(path)
        _keep_unfreeze_step(old, cfg)
        if old.run.steps != cfg.run.steps and cfg.optim.schedule == "cosine":
            log.warning(
                "run.steps %d -> %d: the cosine learning-rate schedule is recomputed for the new "
                "length, so the learning rate jumps at the resumed step",
                old.run.steps,
                cfg.run.steps,
            )
        diff = config_diff(old, cfg)
        if diff:
            raise ConfigError(
                f"{run} holds a run with another config; differing keys:\n  "
                + "\n  ".join(diff)
                + "\nUse another --out folder, or the same settings to resume it."
            )


def _keep_unfreeze_step(old: Config, cfg: Config) -> None:
    g = cfg.grow
    default = g.freeze_steps == default_freeze_steps(g.mode, cfg.run.steps)
    if cfg.phase == "grow" and default and g.freeze_steps != old.grow.freeze_steps:
        log.info(
            "keeping grow.freeze_steps=%s of the run as first written (the default, a quarter "
            "of run.steps, is fixed when a run starts)",
            old.grow.freeze_steps,
        )
        g.freeze_steps = old.grow.freeze_steps


def _write_config(cfg: Config, run: Path, env: Env) -> None:
    if env.main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    _barrier(env)


def _checkpoint(
    cfg: Config, run: Path, env: Env, t: Trainable, step: int, schedule: Schedule
) -> None:
    """Save the training state (rank 0 writes) and export EMA and raw weights."""
    state = t.full_state()
    if env.main:
        save_state(
            run,
            step,
            {
                "step": step,
                "config": to_dict(cfg),
                **state,
            },
            keep=cfg.run.keep,
        )
        meta = export_meta(cfg, schedule, step)
        meta.update(core=t.core_cfg.to_dict(), shell=t.shell_cfg.to_dict())
        export_model(run, state["ema"], meta, name="model")
        export_model(run, state["model"], meta, name="model-raw")
    _barrier(env)


def export_meta(cfg: Config, schedule: Schedule, step: int) -> dict:
    """What inference needs besides the weights (written to RUN/model.json)."""
    return {
        "text_encoder": cfg.data.text_encoder,
        "text_max_length": cfg.data.text_max_length,
        "resolution": cfg.model.resolution,
        "schedule": schedule.to_dict(),
        "guidance": cfg.run.sample_guidance,
        "phase": cfg.phase,
        "mode": cfg.grow.mode,
        "step": step,
    }


class _Logger:
    """Rank 0's outputs: progress bar, RUN/metrics.jsonl, TensorBoard, sample grids."""

    def __init__(self, cfg: Config, run: Path, env: Env, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.metrics = run / "metrics.jsonl"
        _truncate_metrics(self.metrics, start)
        self.tb = SummaryWriter(str(run / "tb"), purge_step=start or None)
        self.samples = run / "samples"
        self.bar = tqdm(
            total=cfg.run.steps,
            initial=start,
            disable=not cfg.run.progress,
            desc=f"{cfg.phase} {cfg.model.resolution}px",
            unit="step",
            dynamic_ncols=True,
        )
        self.last = start

    def log(self, step: int, values: dict) -> None:
        entry = {"step": step, **values, "time": time.time()}
        with self.metrics.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(f"train/{k}", float(v), step)
        self.bar.set_postfix(
            loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}", refresh=False
        )
        self.bar.update(step - self.last)
        self.last = step

    def grid(self, step: int, grid: Image.Image) -> None:
        self.samples.mkdir(parents=True, exist_ok=True)
        path = self.samples / f"step-{step:07d}.png"
        tmp = path.with_suffix(".tmp.png")
        grid.save(tmp)
        tmp.replace(path)
        self.tb.add_image("samples", torch.from_numpy(_to_array(grid)).permute(2, 0, 1), step)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop log lines past `start` (written by an attempt that died before its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line half-written by a kill
            continue
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _to_array(img: Image.Image):
    import numpy as np

    return np.asarray(img.convert("RGB")).copy()
