"""Why a training run stops before its last step (docs/training.md, Losing no work): a
preemption signal, honoured at the next step boundary on every rank, and steps whose gradient
is not finite, skipped on the device and counted without a host sync."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist
from torch import Tensor

from greedygrow.distributed import Env

# SIGTERM: what Kubernetes, torchrun and SLURM send before killing; SIGUSR1: SLURM's --signal
PREEMPTION_SIGNALS = tuple(
    s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None
)


class RunStopped(RuntimeError):
    """Training stopped early, its last good state kept; the message says why and what next."""


class Preempted(RunStopped):
    """A preemption signal arrived: the state is saved and a rerun resumes (exit status 0)."""


class Preemption:
    """While entered, SIGTERM and SIGUSR1 only set a flag; `requested()` agrees across ranks at a
    step boundary, so every rank saves the same step and leaves together."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.received = 0  # the signal's number; 0: none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for s in PREEMPTION_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else here: the loop acts at its next step boundary

    def requested(self) -> str | None:
        """The name of the signal any rank received (one CPU all-reduce under torchrun, over
        the gloo side of the process group: no device sync), or None."""
        received = self.received
        if self.env.world > 1:
            flag = torch.tensor([received], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag)
        return signal.Signals(received).name if received else None


class NonFiniteSteps:
    """Counts, on the device, the steps whose gradient norm was not finite (their update skipped
    by the optimizer, see Trainable.optimizer_step), in total and in a row; read at log steps,
    where run.nonfinite decides whether to go on."""

    def __init__(self, device: torch.device, policy: str, patience: int, total: int = 0) -> None:
        self.policy, self.patience = policy, patience
        self.counts = torch.tensor([float(total), 0.0], device=device)  # [total, in a row]
        self.total = total  # as last read on the host

    def record(self, skipped: Tensor) -> None:
        """Add one step; `skipped` is 1.0 where its update was skipped, else 0.0 (on the device)."""
        self.counts[0] += skipped
        self.counts[1].add_(skipped).mul_(skipped)  # in a row: (n + s) · s, reset by a good step

    def check(self, step: int) -> int:
        """Read the counts (a host sync: log and checkpoint steps only); the total skipped so
        far. Raises RunStopped as run.nonfinite says: at the first (stop), or after
        run.nonfinite_patience in a row (skip)."""
        total, row = (int(x) for x in self.counts.tolist())
        new, self.total = total - self.total, total
        if (self.policy == "stop" and new) or row >= self.patience:
            why = (
                f"{new} step(s) up to step {step} had"
                if self.policy == "stop"
                else f"the {row} steps up to step {step} all had"
            )
            raise RunStopped(
                f"{why} a non-finite gradient norm (run.nonfinite={self.policy}); their updates "
                "were skipped, so the weights, the EMA and every state written are finite. Lower "
                "optim.lr or raise optim.warmup_steps, check the data, and rerun to resume from "
                "the last state"
                + (
                    "; run.nonfinite=skip trains past isolated steps"
                    if self.policy == "stop"
                    else ""
                )
            )
        return total
