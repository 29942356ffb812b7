"""Where a process runs: its device, its rank in a torchrun group, and FSDP2 sharding."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from greedygrow.config import ConfigError
from greedygrow.data.split import rank_and_world

T = TypeVar("T")
STORE_TIMEOUT = timedelta(minutes=30)  # torch's default for gloo and NCCL groups


@dataclass
class Env:
    """Where this process runs: rank, world size and device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed() -> bool:
    """Whether this process is in a torch.distributed group."""
    return dist.is_available() and dist.is_initialized()


def main_process() -> bool:
    """Whether this process writes what one process writes: rank 0, or the only one."""
    return not distributed() or dist.get_rank() == 0


def uses_fsdp(parallel: str, env: Env) -> bool:
    """Whether run.parallel asks for FSDP2 and there is more than one process to shard over."""
    return parallel == "fsdp" and env.world > 1


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" → CUDA when available, else CPU; any other name as given (cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available; use cpu")
    return torch.device(name)


def init_distributed(device: str = "auto") -> Env:
    """Join the torchrun process group if there is one: gloo on CPU; NCCL for CUDA tensors
    beside gloo for CPU ones (the preemption flag is agreed on the host, without a device sync)."""
    dev = resolve_device(device)
    rank, world = rank_and_world()
    if world == 1:
        return Env(0, 1, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        cuda = dev.type == "cuda"
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        dist.init_process_group(
            backend,
            store=_attempt_store(rank, world),
            rank=rank,
            world_size=world,
            device_id=dev if cuda else None,
        )
    return Env(dist.get_rank(), dist.get_world_size(), dev)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's store (MASTER_ADDR:MASTER_PORT) under a prefix of its own for each restart
    attempt. Its agent's store outlives a restart (torchrun --max-restarts), and torch 2.13
    prefixes nothing, so a restarted worker would read the gloo addresses of the attempt before
    and fail to connect ("Connection refused") or hang (docs/training.md)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        timeout=STORE_TIMEOUT,
    )
    return dist.PrefixStore(
        f"greedygrow/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store
    )


def all_mean(x: Tensor, env: Env) -> float:
    """The mean of `x` over all ranks, as a float (a host sync)."""
    if env.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= env.world
    return float(x)


def broadcast(value: T, env: Env) -> T:
    """Rank 0's `value` (anything picklable that rank 0 made) on every rank."""
    if env.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: Env) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if env.world > 1:
        dist.barrier()


def shard(model: nn.Module, bf16: bool) -> None:
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
