"""What a training run updates: the model, its EMA and its AdamW optimizer, wrapped for DDP or
sharded with FSDP2, with the core frozen or trained as the grow mode says."""

from __future__ import annotations

import gc
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from greedygrow.checkpoint import load_core
from greedygrow.config import Config, ConfigError, core_config, shell_config
from greedygrow.distributed import Env, barrier, shard, uses_fsdp
from greedygrow.grow import (
    freeze_core,
    freeze_inherited,
    grow,
    source_shell_config,
    unfreeze_core,
)
from greedygrow.model import UViT
from greedygrow.posthoc_ema import PowerEMA
from greedygrow.state import load_state

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
SHARDED = StateDictOptions(full_state_dict=False)  # each rank's own tensors, as they are
# rank 0 holds a full state dict, the others an empty one; each rank keeps its own shards
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
DRIFT_MODES = ("unfreeze", "joint")  # grow modes that train a phase-1 core: core_drift logged


class Trainable:
    """The model being trained, its EMA, its optimizer, and how it is wrapped (DDP/FSDP2)."""

    def __init__(self, cfg: Config, env: Env, step: int, path: Path | None) -> None:
        """`path`: the training state to resume from at `step` > 0 (state.py), of which every
        rank reads its own shards; None for a fresh run. Its values other than the model, EMA
        and optimizer tensors are left in `self.resumed`."""
        self.cfg, self.env = cfg, env
        self.core_cfg, self.shell_cfg = core_config(cfg), shell_config(cfg)
        self.fsdp = uses_fsdp(cfg.run.parallel, env)
        # a state saved after `step` steps holds the optimizer of the last step taken, step − 1;
        # `begin_step(step)` then unfreezes the core where step `step` is its first trained one
        self.core_frozen = cfg.grow.core_frozen_at(max(step - 1, 0))
        # grow.freeze_inherited: the grown run's shell, whose levels this one keeps frozen
        frozen = cfg.grow.freeze_inherited
        self.inherited_from = source_shell_config(cfg.grow.core) if frozen else None
        self.power = PowerEMA(cfg.optim.posthoc_ema)  # the post-hoc profiles' rule
        self.tracked = PowerEMA([cfg.optim.ema_sigma_rel] if cfg.optim.ema_sigma_rel else [])
        self.model = self._build(step)
        self.phase1 = self._phase1_core(step)  # this rank's shards of θ₁, or None
        # ‖θ₁‖² over this rank's shards, once
        self.phase1_sq = None if self.phase1 is None else sum(p.square().sum() for p in self.phase1)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg, core=not self.core_frozen),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            fused=True,  # one kernel for all parameters: 7× faster than the default on CPU
        )
        self.resumed: dict = {}
        if path is not None:
            self.resumed = load_state(path, like=self.state())
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=self.resumed.pop("model"),
                optim_state_dict=self.resumed.pop("optimizer"),
                options=SHARDED,
            )
            set_model_state_dict(self.ema, self.resumed.pop("ema"), options=SHARDED)
            profiles = self.resumed.pop("posthoc_ema", {})
            for sigma_rel, twin in zip(self.power.sigma_rels, self.profiles, strict=True):
                set_model_state_dict(twin, profiles[f"{sigma_rel:g}"], options=SHARDED)
        self._wrap()

    def _build(self, step: int) -> UViT:
        """The model (grown from the phase-1 core at step 0 of phase 2) and its EMA. Under FSDP2
        only rank 0 materialises initial weights (on CPU); every rank shards meta-device twins
        and receives rank 0's weights by broadcast, so no device ever holds the full model."""
        cfg, env = self.cfg, self.env
        real = not self.fsdp or (env.main and step == 0)
        torch.manual_seed(cfg.run.seed)  # the same initialisation on every rank
        with torch.device("cpu" if real else "meta"):
            if real and step == 0 and cfg.phase == "grow":
                source = None if cfg.grow.mode == "scratch" else cfg.grow.core
                model = grow(source, self.core_cfg, self.shell_cfg, cfg.grow.mode)
            else:
                model = UViT(self.core_cfg, self.shell_cfg)
        twins = 1 + len(cfg.optim.posthoc_ema)  # the EMA, and a twin per post-hoc profile
        if not self.fsdp:
            self._prepare(model).to(env.device)
            self.ema, *self.profiles = [self._twin().to(env.device) for _ in range(twins)]
            for twin in (self.ema, *self.profiles):
                twin.load_state_dict(model.state_dict())
            return model
        initial = model.state_dict() if real else {}  # what rank 0 broadcasts
        with torch.device("meta"):
            model = UViT(self.core_cfg, self.shell_cfg)
            self.ema, *self.profiles = [self._twin() for _ in range(twins)]
        shard(self._prepare(model), bf16=cfg.run.precision == "bf16")
        for twin in (self.ema, *self.profiles):
            shard(twin, bf16=False)
        for target in (model, self.ema, *self.profiles):
            target.to_empty(device=env.device)
            if step == 0:  # (the loader rewrites the dict it gets)
                set_model_state_dict(target, dict(initial), options=FROM_RANK0)
        return model

    def _twin(self) -> UViT:
        """An untrained copy of the model's architecture that holds an average of its weights."""
        return UViT(self.core_cfg, self.shell_cfg).requires_grad_(False).eval()

    def _phase1_core(self, step: int) -> list[Tensor] | None:
        """This rank's shards of the phase-1 core's parameters θ₁, for `core_drift` (unfreeze and
        joint only): the grown core at step 0; on resume read again from grow.core into the model
        (whose resumed state is loaded over it next)."""
        cfg, env, core = self.cfg, self.env, self.model.core
        if cfg.grow.mode not in DRIFT_MODES:
            return None
        if step > 0:
            state = load_core(cfg.grow.core)[1] if env.main or not self.fsdp else {}
            set_model_state_dict(core, state, options=FROM_RANK0 if self.fsdp else FULL)
        return [_local(p).detach().clone() for p in core.parameters()]

    @torch.no_grad()
    def core_drift(self) -> float | None:
        """‖θ − θ₁‖ / ‖θ₁‖ of the core's parameters against phase 1's (None where not tracked):
        one host sync, and a collective under FSDP2."""
        if self.phase1 is None:
            return None
        current = [_local(p) for p in self.model.core.parameters()]
        moved = torch.stack([torch.dist(p, q) for p, q in zip(current, self.phase1, strict=True)])
        # ‖θ − θ₁‖² and ‖θ₁‖² over this rank's shards, summed over the ranks under FSDP2 (DDP
        # ranks hold whole copies); drift = √(‖θ − θ₁‖² / ‖θ₁‖²)
        sums = torch.stack([moved.square().sum(), self.phase1_sq])
        if self.fsdp:
            dist.all_reduce(sums)
        return math.sqrt(float(sums[0] / sums[1]))

    def _prepare(self, model: UViT) -> UViT:
        """Train mode, gradient checkpointing, the core frozen if the mode says so, and the
        inherited shell levels with grow.freeze_inherited."""
        model.train().set_gradient_checkpointing(self.cfg.model.gradient_checkpointing)
        if self.core_frozen:
            freeze_core(model)
        if self.inherited_from is not None:
            freeze_inherited(model, self.inherited_from)
        return model

    def _wrap(self) -> None:
        forward: nn.Module = self.model
        if self.env.world > 1 and not self.fsdp:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.model.compile:
            if self.env.device.type == "cpu" and not any(map(shutil.which, ("c++", "g++"))):
                raise ConfigError(
                    "model.compile=true on CPU needs a C++ compiler (torch.compile writes C++ "
                    "kernels); install g++ (Debian: apt install g++) or set model.compile=false"
                )
            self.model.compile_blocks()
        self.forward = forward

    def begin_step(self, step: int) -> None:
        """Before optimizer step `step` (0-based): unfreeze the core if this is the first step
        that trains it (grow.core_frozen_at, the one rule; unfreeze mode at freeze_steps)."""
        if self.core_frozen and not self.cfg.grow.core_frozen_at(step):
            self.unfreeze_core()

    def unfreeze_core(self) -> None:
        """Train the core from now on (unfreeze mode): its parameters join the optimizer."""
        unfreeze_core(self.model)
        for group in param_groups(self.model, self.cfg, core=True, shell=False):
            self.optimizer.add_param_group(group)
        self.core_frozen = False
        # DDP registers only the parameters that require grad at construction: wrap anew, after
        # the old wrapper (and its gradient hooks, and any graph compiled around it) is gone
        self.forward = self.model
        if self.cfg.model.compile:
            torch._dynamo.reset()
        gc.collect()
        barrier(self.env)
        self._wrap()

    def optimizer_step(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """Backward, clip to optim.grad_clip (0: no clipping), AdamW step; (the gradient norm,
        1.0 if the update was skipped for a non-finite norm else 0.0), both left on the device
        (no host sync). The fused AdamW skips on the device, as under a GradScaler."""
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        skipped = (~torch.isfinite(norm)).float()
        self.optimizer.found_inf = skipped  # read by the fused kernel: no update where 1.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    @torch.no_grad()
    def update_ema(self, step: int, skipped: Tensor) -> None:
        """After optimizer update `step` (1-based), for trained θ: the EMA, ema ← ema +
        (1 − decay)(θ − ema), or a power function of optim.ema_sigma_rel, and the post-hoc
        profiles; a skipped update (`skipped` 1.0) leaves them as they were, and a frozen core's
        already equal it."""
        trained = [p.requires_grad for p in self.model.parameters()]
        current = [_local(p) for p, t in zip(self.model.parameters(), trained, strict=True) if t]
        keep = 1.0 - skipped
        ema = self._trained(self.ema, trained)
        if self.tracked.sigma_rels:
            self.tracked.update(step, [ema], current, keep)
        else:
            weight = keep * (1.0 - self.ema_decay(step - 1))
            torch._foreach_lerp_(ema, current, [weight] * len(ema))
        if self.profiles:
            self.power.update(
                step, [self._trained(t, trained) for t in self.profiles], current, keep
            )

    @staticmethod
    def _trained(twin: UViT, trained: list[bool]) -> list[Tensor]:
        return [_local(e) for e, t in zip(twin.parameters(), trained, strict=True) if t]

    def ema_decay(self, step: int) -> float:
        """The EMA's decay at optimizer step `step` (0-based), with optim.ema_warmup:
        min(decay, (1 + n) / (10 + n))."""
        decay = self.cfg.optim.ema_decay
        return min(decay, (1 + step) / (10 + step)) if self.cfg.optim.ema_warmup else decay

    def state(self) -> dict:
        """The model, optimizer, EMA and post-hoc profiles as state dicts of this rank's tensors
        (under FSDP2 its shards, as DTensors; nothing is gathered or copied): what state.py
        saves, and fills in place on resume."""
        model, optim = get_state_dict(self.model, self.optimizer, options=SHARDED)
        return {
            "model": model,
            "optimizer": optim,
            "ema": get_model_state_dict(self.ema, options=SHARDED),
            "posthoc_ema": {
                f"{s:g}": get_model_state_dict(twin, options=SHARDED)
                for s, twin in zip(self.power.sigma_rels, self.profiles, strict=True)
            },
        }

    def exports(self) -> dict[str, dict[str, Tensor]]:
        """The EMA's and the raw weights by export name, as this rank's tensors (checkpoint.
        export_model gathers shards one tensor at a time)."""
        return {
            "model": get_model_state_dict(self.ema, options=SHARDED),
            "model-raw": get_model_state_dict(self.model, options=SHARDED),
        }

    def profile_states(self) -> dict[str, dict[str, Tensor]]:
        """The post-hoc EMA profiles' state dicts (this rank's tensors) by f"{sigma_rel:g}"."""
        return {
            f"{s:g}": get_model_state_dict(twin, options=SHARDED)
            for s, twin in zip(self.power.sigma_rels, self.profiles, strict=True)
        }


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def param_groups(model: UViT, cfg: Config, core: bool, shell: bool = True) -> list[dict]:
    """AdamW groups: shell then core, each split into decayed (matrices) and not (the rest);
    frozen parameters (requires_grad False) are left out."""
    core_ids = {id(p) for p in model.core.parameters()}
    # the multiplier slows a phase-1 core that goes on training; a core being learned (phase 1,
    # scratch) trains at the shell's rate
    trained_on = cfg.grow.mode in ("unfreeze", "joint")
    core_mult = cfg.optim.core_lr_multiplier if trained_on else 1.0
    groups = []
    for name, wanted, mult in (("shell", shell, 1.0), ("core", core, core_mult)):
        params = [
            p
            for p in model.parameters()
            if p.requires_grad and (id(p) in core_ids) == (name == "core")
        ]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if wanted and chosen:
                weight_decay = cfg.optim.weight_decay if decay else 0.0
                groups.append(
                    {"params": chosen, "name": name, "lr_mult": mult, "weight_decay": weight_decay}
                )
    return groups
