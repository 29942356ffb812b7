"""The training loop's overhead over the bare model step, and the cost of each of its pieces.

    python benchmarks/bench_loop.py [--steps 10] [--config core-cpu] [key=value ...]

In one process, on a preset (default core-cpu: cpu-small core, 32 px, batch 32, bf16):
  * loop step: `greedygrow.train.train` on a fresh run folder (with its own, empty text and
    scene caches, as a fresh `greedygrow train-core` run), per step after warm-up;
  * bare step: forward + loss + backward + AdamW of the same model on one fixed batch already
    in memory, run after each loop step (and not counted in it), so both see the same load;
  * the pieces of a step, alone, old and new: text embeddings, per-sample randomness, a
    batch of data in the main process, EMA update.
Each figure is wall and CPU milliseconds (this process's threads plus its DataLoader
workers). On a machine shared with other jobs read `--threads 1`: OpenMP threads spin while
waiting for a descheduled partner, which inflates CPU time at 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import greedygrow.train as training
from greedygrow.allocator import keep_freed_memory
from greedygrow.config import Config, train_core_config
from greedygrow.data.split import mix_seed
from greedygrow.diffusion import schedule_for, training_loss
from greedygrow.distributed import init_distributed
from greedygrow.trainable import Trainable

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds of this process and of its live children (DataLoader workers)."""
    total = time.process_time()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # exited meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    return total


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median wall seconds, mean CPU seconds) of `fn()`."""
    for _ in range(warmup):
        fn()
    walls, cpu = [], cpu_seconds()
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - tic)
    return statistics.median(walls), (cpu_seconds() - cpu) / repeats


def bare_step(trainable: Trainable, optimizer_step: Callable) -> Callable[[], None]:
    """forward + loss + backward + `optimizer_step` (AdamW) of `trainable` on one fixed batch
    in memory."""
    cfg, env = trainable.cfg, trainable.env
    schedule = schedule_for(cfg.model.resolution, cfg.diffusion.schedule)
    b, r, length = cfg.run.batch_size, cfg.model.resolution, cfg.data.text_max_length
    dim = trainable.core_cfg.text_dim
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, r, r, generator=g) * 2 - 1
    tokens, pooled = torch.randn(b, length, dim, generator=g), torch.randn(b, dim, generator=g)
    mask = (torch.arange(length) < 12).expand(b, length).clone()
    t, noise = torch.rand(b, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g)
    drop = torch.rand(b, generator=g) < cfg.data.caption_dropout
    bf16 = cfg.run.precision == "bf16"

    def denoise(z, logsnr):
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            return trainable.forward(z, logsnr, tokens, mask, pooled, drop_text=drop)

    def step():
        loss = training_loss(denoise, x, schedule, t, noise, cfg.diffusion.weighting).mean()
        optimizer_step(trainable, loss)

    return step


def loop_and_bare(cfg_file: str, overrides: list[str], steps: int, out: Path) -> dict:
    """`train` on a fresh folder, logging every step, with a bare step of the same model run
    after each of its steps (and subtracted from it): per step after warm-up, median wall
    seconds and mean CPU seconds of each, the median of their ratio, and the set-up (wall
    seconds from the call to the first step). Pairing the two steps in time cancels the drift
    of a shared machine."""
    warm = 3
    over = [*overrides, f"run.steps={warm + steps}", "run.log_every=1"]
    over += ["run.checkpoint_every=0", "run.sample_every=0", "run.progress=false"]
    marks: dict[int, tuple[float, float]] = {}
    bare: list[tuple[float, float]] = []  # (wall, CPU) of the bare step after each loop step
    log, step_fn, first = training.RunLogger.log, training.Trainable.optimizer_step, []

    def mark(self, step: int, values: dict) -> None:
        marks[step] = time.perf_counter(), cpu_seconds()
        log(self, step, values)

    def step_then_bare(self, loss):
        first.append(first[0] if first else time.perf_counter())
        norm = step_fn(self, loss)
        if not hasattr(self, "bare"):
            self.bare = bare_step(self, step_fn)
        wall, cpu = time.perf_counter(), cpu_seconds()
        self.bare()
        bare.append((time.perf_counter() - wall, cpu_seconds() - cpu))
        return norm

    training.RunLogger.log, training.Trainable.optimizer_step = mark, step_then_bare
    try:
        tic = time.perf_counter()
        training.train(train_core_config(cfg_file, over), out)
    finally:
        training.RunLogger.log, training.Trainable.optimizer_step = log, step_fn
    timed_steps = range(warm + 1, warm + steps + 1)
    loop = [
        (
            marks[s][0] - marks[s - 1][0] - bare[s - 1][0],
            marks[s][1] - marks[s - 1][1] - bare[s - 1][1],
        )
        for s in timed_steps
    ]
    paired = [bare[s - 1] for s in timed_steps]
    return {
        "bare": (statistics.median(w for w, _ in paired), statistics.mean(c for _, c in paired)),
        "loop": (statistics.median(w for w, _ in loop), statistics.mean(c for _, c in loop)),
        "ratio": (
            statistics.median(a[0] / b[0] for a, b in zip(loop, paired, strict=True)),
            statistics.median(a[1] / b[1] for a, b in zip(loop, paired, strict=True)),
        ),
        "setup": first[0] - tic,
    }


def per_sample_generators(cfg: Config, step: int, first: int, x: torch.Tensor):
    """The per-sample randomness before the batched draw: one torch.Generator per sample."""
    drops, ts, noises = [], [], []
    for i in range(x.shape[0]):
        g = torch.Generator(x.device).manual_seed(mix_seed(cfg.run.seed, step, first + i))
        u = torch.rand(2, generator=g, device=x.device, dtype=torch.float64)
        drops.append(u[0] < cfg.data.caption_dropout)
        ts.append(u[1])
        noises.append(torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype))
    return torch.stack(drops), torch.stack(ts), torch.stack(noises)


def pieces(cfg: Config, repeats: int) -> dict[str, tuple[float, float]]:
    """Each piece of a step alone, old and new side by side."""
    from greedygrow.data import ScenesDataset
    from greedygrow.data.scene_cache import SceneCache
    from greedygrow.data.transforms import to_float
    from greedygrow.text import shared_text_encoder
    from greedygrow.text_cache import CachedTextEncoder

    env = init_distributed(cfg.run.device)
    b, r = cfg.run.batch_size, cfg.model.resolution
    out = {}
    dataset = ScenesDataset(cfg.data.count, r, cfg.run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = CachedTextEncoder(
            shared_text_encoder(cfg.data.text_encoder, cfg.data.text_max_length, "cpu"), tmp
        )
        captions = [dataset.caption(i) for i in range(8 * b)]
        out["text: MiniLM encode (a fresh run)"] = timed(
            lambda: encoder.encoder.encode(captions[:b]), max(2, repeats // 4)
        )
        table = encoder.table(captions, env.device, 1 << 30)
        encoder.flush()
        out["text: CachedTextEncoder.encode, warm"] = timed(
            lambda: encoder.encode(captions[:b]), repeats
        )
        rows = torch.randperm(8 * b)[:b]
        out["text: TextTable gather"] = timed(lambda: table[rows], repeats)
    for batch, res in ((b, r), (16, 128)):
        x = torch.zeros(batch, 3, res, res)
        out[f"noise {batch}×{res}px: per-sample generators"] = timed(
            lambda x=x: per_sample_generators(cfg, 5, 0, x), repeats
        )
        out[f"noise {batch}×{res}px: batched counter-based"] = timed(
            lambda x=x: training._step_randomness(cfg, 5, 0, x), repeats
        )
    loader = iter(DataLoader(dataset, batch_size=b, shuffle=True))
    out[f"data: {b} scenes drawn (workers=0)"] = timed(lambda: next(loader), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        cache = SceneCache(dataset, tmp, captions=False)
        for i in range(repeats * b):
            cache[i]
        loader = iter(DataLoader(cache, batch_size=b))
        out[f"data: {b} scenes from SceneCache, warm"] = timed(lambda: next(loader), repeats - 1)
        pixels = cache[0]["image"].expand(b, 3, r, r).contiguous()
        out["data: uint8 → float (to_float)"] = timed(lambda: to_float(pixels), repeats)
    trainable = Trainable(cfg, env, 0, None)
    out.update(guards(trainable, repeats))
    out["preemption flag, agreed by 2 gloo processes"] = agreed_flag(repeats * 50)
    return out


def guards(trainable: Trainable, repeats: int) -> dict[str, tuple[float, float]]:
    """The optimizer step and EMA update without and with the non-finite guard (the found_inf
    given to the fused AdamW, the device-side counters, the EMA weight kept on the device), and
    the single-process preemption check, on the gradients of one backward."""
    from greedygrow.stopping import NonFiniteSteps, Preemption

    cfg, env = trainable.cfg, trainable.env
    bare_step(trainable, lambda t, loss: loss.backward())()  # gradients to step with
    params = [p for p in trainable.model.parameters() if p.requires_grad]
    ema = [
        e
        for e, p in zip(trainable.ema.parameters(), trainable.model.parameters(), strict=True)
        if p.requires_grad
    ]
    opt, counts = trainable.optimizer, NonFiniteSteps(env.device, "skip", 20)

    def unguarded() -> None:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.found_inf = None
        opt.step()
        torch._foreach_lerp_(ema, params, 1 - 0.999)

    def guarded() -> None:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        skipped = (~torch.isfinite(norm)).float()
        opt.found_inf = skipped
        opt.step()
        counts.record(skipped)
        trainable.update_ema(100, skipped)

    out = {}
    for _ in range(3):  # interleaved: a shared machine's drift hits both alike
        out["AdamW + EMA, unguarded"] = timed(unguarded, repeats)
        out["AdamW + EMA, non-finite guard"] = timed(guarded, repeats)
    with Preemption(env) as preemption:
        out["preemption check, 1 process"] = timed(preemption.requested, repeats * 50)
    return out


def _flag_worker(rank: int, store: str, repeats: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from greedygrow.distributed import Env
    from greedygrow.stopping import Preemption

    with Preemption(Env(rank, 2, torch.device("cpu"))) as preemption:
        wall, cpu = timed(preemption.requested, repeats)
    if rank == 0:
        Path(out).write_text(f"{wall} {cpu}")
    dist.destroy_process_group()


def agreed_flag(repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the preemption check's all-reduce between 2 gloo processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out"
        mp.spawn(_flag_worker, args=(f"{tmp}/store", repeats, out), nprocs=2)
        wall, cpu = map(float, Path(out).read_text().split())
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps of the loop")
    p.add_argument("--config", default="core-cpu")
    p.add_argument("--parts", default="pieces,loop", help="which measurements")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", help="key=value over the preset")
    args = p.parse_args()
    keep_freed_memory()  # as the command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    cfg = train_core_config(args.config, args.overrides)
    print(
        f"{args.config} {' '.join(args.overrides)}: torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':45s} {'wall ms':>9s} {'CPU ms':>9s}")
    if "pieces" in parts:
        for name, (wall, cpu) in pieces(cfg, 20).items():
            print(f"{name:45s} {1e3 * wall:9.2f} {1e3 * cpu:9.2f}")
    if "loop" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            got = loop_and_bare(args.config, args.overrides, args.steps, Path(tmp) / "run")
        for name in ("bare", "loop"):
            wall, cpu = got[name]
            print(f"{name + ' step':45s} {1e3 * wall:9.0f} {1e3 * cpu:9.0f}")
        wall, cpu = (100 * (r - 1) for r in got["ratio"])
        print(f"{'loop overhead over the bare step':45s} {wall:8.1f}% {cpu:8.1f}%")
        print(f"{'set-up before the first step (wall s)':45s} {got['setup']:9.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
