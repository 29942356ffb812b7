"""The training loop for both phases of greedy growing, single process or under torchrun.

Every random draw of a step is seeded by (seed, step, global sample index) and the data order
by (seed, global sample position), so no RNG state is carried across a restart or a change of
world size (docs/training.md, Resume and Determinism)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import IterableDataset

from greedygrow.accounting import KEYS as ACCOUNT_KEYS
from greedygrow.accounting import Account
from greedygrow.checkpoint import export_model, read_meta
from greedygrow.config import (
    Config,
    ConfigError,
    resolve,
    run_config,
    save_config,
    to_dict,
    validate,
)
from greedygrow.data import ScenesDataset, make_dataset, make_mixture
from greedygrow.data.order import StepSampler, TextRows, step_batches
from greedygrow.data.scene_cache import SceneCache
from greedygrow.data.split import (
    counter_draws,
    counter_normals,
    mix_seed,
    mix_seed_tensor,
    unit_floats,
)
from greedygrow.data.transforms import to_float
from greedygrow.diffusion import Schedule, schedule_for, training_loss
from greedygrow.distributed import (
    Env,
    all_mean,
    barrier,
    broadcast,
    init_distributed,
)
from greedygrow.posthoc_ema import SNAPSHOT_DIR, save_snapshot
from greedygrow.run_folder import RunLogger, check_resume, export_meta
from greedygrow.sample import sample_grid
from greedygrow.state import latest_state, list_states, save_state
from greedygrow.stopping import NonFiniteSteps, Preempted, Preemption
from greedygrow.text import shared_text_encoder
from greedygrow.text_cache import CachedTextEncoder, TextTable
from greedygrow.trainable import Trainable

log = logging.getLogger(__name__)


def train(cfg: Config, out: str | Path) -> Path:
    """Train (or resume) the run in folder `out`; returns it. Works under torchrun."""
    cfg = resolve(cfg)
    validate(cfg)
    env = init_distributed(cfg.run.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with Preemption(env) as preemption:  # from here on, a signal only sets its flag
            _train(cfg, Path(out), env, preemption)
        return Path(out)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if env.world > 1:
            dist.destroy_process_group()


def _setup(cfg: Config, run: Path, env: Env, step: int) -> None:
    """Refuse what cannot resume from `step` or split, before any work; set the numeric modes."""
    check_resume(cfg, run, step)
    if cfg.run.batch_size % env.world:
        raise ConfigError(
            f"run.batch_size={cfg.run.batch_size} (global) is not divisible by the "
            f"{env.world} processes; pick a multiple of {env.world}"
        )
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # one batch shape per run: autotune convs once


def _train(cfg: Config, run: Path, env: Env, preemption: Preemption) -> None:
    # rank 0 picks the state (warning about damaged ones); every rank reads its own shards
    step, path = broadcast(latest_state(run) if env.main else None, env) or (0, None)
    _setup(cfg, run, env, step)
    schedule = schedule_for(cfg.model.resolution, cfg.diffusion.schedule)
    if step >= cfg.run.steps:  # rerunning a finished recipe costs nothing (no data, no model)
        if env.main:
            log.info("%s is trained to step %d; raise run.steps to go on", run, step)
        return
    if env.main and step:
        log.info("resuming %s from step %d", run, step)
    if step == 0:
        _check_core_finished(cfg)
    encoder = CachedTextEncoder(
        shared_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, str(env.device)),
        cfg.data.text_cache_dir or run / "text-cache",
    )
    trainable = Trainable(cfg, env, step, path)  # a core that does not fit is refused here
    saved = trainable.resumed  # what only the state knows
    account = Account(cfg, env, saved.get("compute"), _cost_before(cfg))
    nonfinite = NonFiniteSteps(
        env.device, cfg.run.nonfinite, cfg.run.nonfinite_patience, saved.get("nonfinite_steps", 0)
    )
    if env.main:
        save_config(cfg, run / "config.yaml")
    barrier(env)
    batches, table = _data(cfg, env, step, run, encoder)
    text_source = encoder if table is None else table
    logger = RunLogger(cfg, run, step) if env.main else None
    losses, busy = [], 0.0
    try:
        while step < cfg.run.steps:
            trainable.begin_step(step)
            tic = time.perf_counter()
            lr = _set_lr(trainable.optimizer, cfg, step)
            loss = _loss(trainable, next(batches), text_source, schedule, step)
            grad_norm, skipped = trainable.optimizer_step(loss)
            nonfinite.record(skipped)
            step += 1
            trainable.update_ema(step, skipped)
            losses.append(loss.detach())
            if due := _due(step, cfg.run.log_every, cfg.run.steps):  # syncs: before the clock
                mean_loss, norm = _finite_mean(losses, env), float(grad_norm)
                drift = trainable.core_drift()  # collective under FSDP2
                skipped_steps = nonfinite.check(step)  # stops as run.nonfinite says
            busy += time.perf_counter() - tic
            if due:
                cost = account.phase(step)  # collective
                values = {
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "images_per_s": len(losses) * cfg.run.batch_size / busy,
                    "core_frozen": trainable.core_frozen,
                    "skipped_steps": skipped_steps,
                    **cost,
                }
                if cfg.phase == "grow":  # and the phases before it, where known
                    values |= {f"total_{k}": v for k, v in (account.total(cost) or {}).items()}
                if drift is not None:
                    values["core_drift"] = drift
                if logger is not None:
                    logger.log(step, values)
                losses, busy = [], 0.0
            stop = preemption.requested()  # a CPU collective under torchrun
            if stop or _due(step, cfg.run.checkpoint_every, cfg.run.steps):
                _checkpoint(trainable, account, nonfinite, run, step, schedule)
            snapshot_every = cfg.run.ema_snapshot_every or cfg.run.checkpoint_every
            if trainable.profiles and _due(step, snapshot_every, cfg.run.steps):
                _snapshot(trainable, run, step)
            if stop:
                raise Preempted(
                    f"{stop} received: training state saved at step {step} in {run}; "
                    "run the same command again to resume"
                )
            if cfg.run.sample_every and _due(step, cfg.run.sample_every, cfg.run.steps):
                _sample(trainable, encoder, schedule, step, logger)
    finally:
        if logger is not None:
            logger.close()


def _checkpoint(
    trainable: Trainable,
    account: Account,
    nonfinite: NonFiniteSteps,
    run: Path,
    step: int,
    schedule: Schedule,
) -> None:
    """The training state (every rank writes its shards) and the exports after `step` (rank 0
    writes them), with what they cost; collectives: every rank calls it."""
    cfg, env = trainable.cfg, trainable.env
    skipped_steps = nonfinite.check(step)
    drift, cost = trainable.core_drift(), account.phase(step)
    state = trainable.state() | {
        "step": step,
        "config": to_dict(cfg),
        "compute": cost,
        "nonfinite_steps": skipped_steps,
    }
    save_state(run, step, state, keep=cfg.run.keep)  # refuses NaN/inf on every rank
    meta = export_meta(cfg, step, schedule, drift, {"phase": cost, "total": account.total(cost)})
    for name, weights in trainable.exports().items():  # collectives under FSDP2
        export_model(run, weights, meta, name=name)
    barrier(env)


def _snapshot(trainable: Trainable, run: Path, step: int) -> None:
    """RUN/ema/ema-XXXXXXXX.safetensors: the post-hoc EMA profiles' parameters after `step`
    (collective: every rank calls it; rank 0 writes)."""
    states = trainable.profile_states()
    names = [name for name, _ in trainable.model.named_parameters()]
    tensors = {f"{s}/{n}": state[n] for s, state in states.items() for n in names}
    save_snapshot(run / SNAPSHOT_DIR, step, trainable.power.sigma_rels, tensors)
    barrier(trainable.env)


def _finite_mean(losses: list[Tensor], env: Env) -> float:
    """The mean of the finite losses of the steps since the last log line, over all ranks (NaN
    where none was finite): a skipped step does not hide the others."""
    stacked = torch.stack(losses)
    finite = torch.isfinite(stacked)
    mean = torch.where(finite, stacked, 0.0).sum() / finite.sum()  # 0/0 = NaN
    return all_mean(mean, env)


def _cost_before(cfg: Config) -> dict | None:
    """The summed cost of the phases before this one: none for phase 1; a grown run's core's
    (its meta's compute.total); None where unknown (scratch mode, or an older export)."""
    if cfg.phase == "core":
        return dict.fromkeys(ACCOUNT_KEYS, 0.0)
    if cfg.grow.mode == "scratch":
        return None
    return (read_meta(cfg.grow.core).get("compute") or {}).get("total")


def _check_core_finished(cfg: Config) -> None:
    """Refuse to grow from a phase-1 run folder that stopped before its run.steps (preempted,
    killed); exported models (shipped, `greedygrow ema`) hold no states: taken as they are."""
    if cfg.phase == "core" or cfg.grow.mode == "scratch" or not list_states(cfg.grow.core):
        return
    trained, planned = read_meta(cfg.grow.core).get("step"), run_config(cfg.grow.core).run.steps
    if trained is not None and trained < planned:
        raise ConfigError(
            f"grow.core {cfg.grow.core} is trained to step {trained} of its {planned}: rerun its "
            "train-core command to finish it (it resumes), then grow"
        )


def _due(step: int, every: int, last: int) -> bool:
    """Whether a periodic job (every N steps; 0: only at the end) runs after `step`."""
    return (every > 0 and step % every == 0) or step == last


def _sample(trainable: Trainable, encoder, schedule: Schedule, step: int, logger) -> None:
    """A grid at the fixed prompts and seeds from the EMA (a sharded EMA samples on every
    rank; rank 0 writes it)."""
    cfg, env = trainable.cfg, trainable.env
    if not (env.main or trainable.fsdp):
        return
    grid = sample_grid(
        trainable.ema,
        encoder,
        schedule,
        cfg.run.sample_prompts,
        cfg.run.sample_per_prompt,
        cfg.run.sample_steps,
        cfg.run.sample_sampler,
        cfg.run.sample_guidance,
        cfg.run.seed,
        env.device,
        bf16=cfg.run.precision == "bf16",
    )
    if trainable.fsdp:
        trainable.ema.reshard()  # FSDP2 keeps the root unsharded after a forward without backward
    if logger is not None:
        logger.grid(step, grid)


def _loss(
    trainable: Trainable,
    batch: dict,
    text_source: TextTable | CachedTextEncoder,
    schedule: Schedule,
    step: int,
) -> Tensor:
    """The mean diffusion loss of this rank's share of the global batch at `step`; its text
    from the table by "text_row", else encoded (through the cache) from "caption"."""
    cfg, env = trainable.cfg, trainable.env
    x = batch["image"].to(env.device, non_blocking=True)
    x = to_float(x) if x.dtype == torch.uint8 else x
    if isinstance(text_source, TextTable):
        text = text_source[batch["text_row"]]
    else:
        text = text_source.encode(list(batch["caption"])).to(env.device)
    first = step * cfg.run.batch_size + env.rank * (cfg.run.batch_size // env.world)
    drop, t, noise = _step_randomness(cfg, step, first, x)
    torch.manual_seed(mix_seed(cfg.run.seed, step, env.rank, 1))  # dropout, if any
    bf16 = cfg.run.precision == "bf16"

    def denoise(z: Tensor, logsnr: Tensor) -> Tensor:
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            return trainable.forward(z, logsnr, text.tokens, text.mask, text.pooled, drop_text=drop)

    spec = cfg.diffusion
    loss = training_loss(
        denoise,
        x,
        schedule,
        t,
        noise,
        spec.weighting,
        spec.multiscale,
        spec.sigmoid_bias,
        spec.min_snr_gamma,
    )
    return loss.mean()


def _step_randomness(
    cfg: Config, step: int, first: int, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Caption-drop flags [b], t [b] and noise like x, drawn at once on x's device: sample i's
    draws are SplitMix64's stream from the seed mix_seed(seed, step, first + i) — draw 1 the
    drop, 2 t, then one draw per two noise values (data/split.py)."""
    b, n = x.shape[0], x[0].numel()
    keys = mix_seed_tensor((cfg.run.seed, step), first + torch.arange(b, device=x.device))
    u = unit_floats(counter_draws(keys, 2))
    noise = counter_normals(keys, 3, (n + 1) // 2)[:, :n].reshape(x.shape).to(x.dtype)
    return u[:, 0] < cfg.data.caption_dropout, u[:, 1], noise


def _data(
    cfg: Config, env: Env, start: int, run: Path, encoder: CachedTextEncoder
) -> tuple[Iterator[dict], TextTable | None]:
    """This rank's batches from step `start` on, and the table of the embeddings of every
    caption they hold (None where captions are not known up front, or too many)."""
    data = cfg.data
    if data.mixture:  # no scene cache: it holds a plain ScenesDataset's images
        r, seed = cfg.model.resolution, cfg.run.seed
        dataset = make_mixture(data.mixture, r, True, data.min_native, seed)
    else:
        count = data.count if data.source == "scenes" else None
        dataset = make_dataset(
            data.source,
            data.path,
            cfg.model.resolution,
            train=True,
            min_native=data.min_native,
            seed=cfg.run.seed,
            count=count,
        )
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise ConfigError(
            f"data set {data.source}:{data.path} is empty at min_native={data.min_native}"
        )
    table = rows = None
    if hasattr(dataset, "caption") and data.text_table_mb > 0:
        b = cfg.run.batch_size
        sampler = StepSampler(len(dataset), b, env.rank, env.world, cfg.run.seed, start)
        rows, table = _text_table(dataset, sampler.indices_read(cfg.run.steps), encoder, cfg, env)
    cached = isinstance(dataset, ScenesDataset) and data.scene_cache_mb > 0
    if cached and SceneCache.nbytes(dataset) <= data.scene_cache_mb << 20:
        dataset = SceneCache(dataset, data.scene_cache_dir or run / "scenes", table is None)
    if table is not None:
        dataset = TextRows(dataset, rows)
    batches = step_batches(
        dataset,
        cfg.run.batch_size,
        env.rank,
        env.world,
        cfg.run.seed,
        start,
        data.workers,
        pin_memory=env.device.type == "cuda",
    )
    return batches, table


def _text_table(
    dataset, indices: np.ndarray, encoder: CachedTextEncoder, cfg: Config, env: Env
) -> tuple[np.ndarray | None, TextTable | None]:
    """(row of each item's caption, −1 for items not read; the table of those captions)."""
    tic = time.perf_counter()
    if env.main:
        log.info("text: embedding the captions of %d items for the table", len(indices))
    numbers: dict[str, int] = {}
    rows = np.full(len(dataset), -1, dtype=np.int64)
    for i in indices.tolist():
        rows[i] = numbers.setdefault(dataset.caption(i), len(numbers))
    table = encoder.table(list(numbers), env.device, cfg.data.text_table_mb << 20)
    encoder.flush()
    if table is None:
        log.info("text: %d captions exceed data.text_table_mb; encoding per step", len(numbers))
        return None, None
    if env.main:
        log.info(
            "text: table of %d captions (%d items), %.0f MB on %s, in %.1f s",
            len(numbers),
            len(indices),
            table.nbytes / 2**20,
            env.device,
            time.perf_counter() - tic,
        )
    return rows, table


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
    optim = cfg.optim
    # warm-up: lr · min(1, (n + 1) / W), n steps since `start` (where an unfrozen core starts)
    warm = min(1.0, (step - start + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "constant":
        return optim.lr * warm
    total = max(cfg.run.steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / total, 1.0)
    # cosine: f + (1 − f) · ½ (1 + cos(π p)), p the fraction of post-warm-up steps done
    f = optim.final_lr_fraction
    return optim.lr * warm * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))
