"""torchrun with 2 gloo processes (DDP and FSDP2) equals 1 process with the same global batch,
a run resumes on another number of processes, and a preemption signal stops every rank at the
same step."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from greedygrow.distributed import shard
from greedygrow.model.layers import Linear
from greedygrow.state import INDEX, list_states, load_state, state_path
from test_model import inputs, randomise_zero_inits, tiny_uvit
from test_train import GROW, TINY

STEPS = 4
# Launch failures that are not our code's: a port taken between torchrun's choice and its use.
# Such a launch is retried once, with a warning; a failure that repeats still fails the test.
TRANSIENT = ("Address already in use", "EADDRINUSE", "failed to listen on any local network")


def _run(
    out: Path, nproc: int, text_cache: Path, *extra: str, command=("train-core", *TINY)
) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "greedygrow"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "greedygrow",
        ]
    )
    cmd = [
        *launcher,
        command[0],
        "--out",
        str(out),
        *command[1:],
        f"run.steps={STEPS}",
        "run.checkpoint_every=2",
        f"data.text_cache_dir={text_cache}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = out.with_name(out.name + ".before")  # the run folder as given, for a retry
    if out.exists():
        shutil.copytree(out, before)
    for attempt in (1, 2):
        if attempt == 2:
            shutil.rmtree(out, ignore_errors=True)
            if before.exists():
                shutil.copytree(before, out)
        # a session of its own, so a hung run is killed with its torchrun workers
        proc = subprocess.Popen(
            cmd, env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(cmd[:6])} ... hung for 300 s:\n{stderr[-3000:]}")
        if proc.returncode == 0 or attempt == 2 or not any(m in stderr for m in TRANSIENT):
            break
        warnings.warn(f"transient torchrun failure, retrying once:\n{stderr[-1000:]}", stacklevel=2)
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-4, abs=1e-6)
    for name in ("model-raw.safetensors", "model.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    text_cache = tmp_path_factory.mktemp("text-cache")
    run = tmp_path_factory.mktemp("single") / "run"
    _run(run, 1, text_cache)
    return run, text_cache


@pytest.fixture(scope="module")
def fsdp(single, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _run(run, 2, single[1], "run.parallel=fsdp")
    return run


def test_ddp_two_processes_equal_one_with_the_same_global_batch(single, tmp_path):
    reference, text_cache = single
    run = tmp_path / "ddp"
    _run(run, 2, text_cache, "run.parallel=ddp")
    _assert_same_run(run, reference)
    assert len(list((run / "tb").iterdir())) == 1  # rank 0 alone writes logs


def test_fsdp2_two_processes_equal_one_with_the_same_global_batch(single, fsdp):
    _assert_same_run(fsdp, single[0])
    assert len(list((fsdp / "tb").iterdir())) == 1


def test_fsdp2_states_hold_each_rank_s_own_shards_and_no_full_copy(fsdp, single):
    path = state_path(fsdp, STEPS)
    files = json.loads((path / INDEX).read_text())["files"]
    assert {name.split("-")[1] for name in files} == {"00001", "00002"}  # written by both ranks
    full = load_state(path)  # gathered in this process, for comparison
    rows: dict[str, list[int]] = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open)
                rows.setdefault(key, []).append((f.get_slice(key).get_shape() or [1])[0])
    for key, sizes in rows.items():  # each tensor is written once: whole, or split in two
        part, name = key.split("/", 1)
        if part in ("model", "ema"):
            total = full[part][name].shape[0] if full[part][name].ndim else 1
            assert sum(sizes) == total, key
            assert len(sizes) == (2 if total > 1 else 1), key
    reference = load_state(state_path(single[0], STEPS))
    for part in ("model", "ema"):
        for k, v in reference[part].items():
            torch.testing.assert_close(full[part][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp2_sample_grids_from_the_sharded_ema_leave_training_unchanged(single, tmp_path):
    reference, text_cache = single
    run = tmp_path / "sampling"
    _run(run, 2, text_cache, "run.parallel=fsdp", "run.sample_every=1")
    assert len(list((run / "samples").glob("*.png"))) == STEPS  # rank 0 writes every grid
    _assert_same_run(run, reference)


def test_fsdp2_bf16_computes_with_bf16_parameters_and_keeps_fp32_masters():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_uvit("grown", 32)
        randomise_zero_inits(model)
        shard(model, bf16=True)
        used = []
        linear = next(m for m in model.core.blocks[0].modules() if isinstance(m, Linear))
        linear.register_forward_pre_hook(lambda m, _: used.append(m.weight.dtype))
        residual = []
        model.core.blocks[0].register_forward_pre_hook(lambda m, a: residual.append(a[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs(2, 32))
        out.float().square().mean().backward()
        assert used == [torch.bfloat16]  # gathered in bf16 for compute ...
        assert residual == [torch.float32]  # ... around a float32 residual stream, as with DDP
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # ... master shards fp32
        assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_two_processes_match_one_bf16_process(single, tmp_path):
    text_cache = single[1]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1, text_cache, "run.precision=bf16")
    _run(two, 2, text_cache, "run.precision=bf16", "run.parallel=fsdp")
    # not bit-equal: norms, biases and embeddings now see bf16 parameters, not fp32 ones
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-3)
    wa, wb = load_file(two / "model-raw.safetensors"), load_file(one / "model-raw.safetensors")
    assert {t.dtype for t in wa.values()} == {torch.float32}
    # Adam moves a weight by at most ~lr per step whatever its gradient, so tiny gradient
    # differences may show as up to STEPS × lr (1e-3) where a gradient is near zero
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=STEPS * 1e-3, msg=k)


def test_resume_on_a_different_number_of_processes(single, fsdp, tmp_path):
    reference, text_cache = single
    run = tmp_path / "resized"
    shutil.copytree(fsdp, run)  # the 2-process FSDP2 run's state at step 2 ...
    shutil.rmtree(state_path(run, STEPS))
    done = _run(run, 1, text_cache)  # ... finished by one process
    assert f"resuming {run} from step 2" in done.stderr
    _assert_same_run(run, reference)


def test_fsdp2_resumes_on_two_processes_like_an_uninterrupted_run(single, fsdp, tmp_path):
    reference, text_cache = single
    run = tmp_path / "resumed"
    shutil.copytree(fsdp, run)
    shutil.rmtree(state_path(run, STEPS))  # as if killed after the step-2 checkpoint
    done = _run(run, 2, text_cache, "run.parallel=fsdp")
    assert f"resuming {run} from step 2" in done.stderr
    _assert_same_run(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_unfreeze_on_two_processes_equals_one_process(tmp_path, single, parallel):
    core_run = tmp_path / "core"
    _run(core_run, 1, single[1])
    grow = (
        "grow",
        "--core",
        str(core_run),
        "--resolution",
        "16",
        "--mode",
        "unfreeze",
        "--freeze-steps",
        "2",
        *GROW,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1, single[1], command=grow)
    _run(two, 2, single[1], f"run.parallel={parallel}", command=grow)
    _assert_same_run(two, one)
    frozen = [
        json.loads(x)["core_frozen"] for x in (two / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert frozen == [True, True, False, False]


def _launch(out: Path, text_cache: Path, steps: int, *torchrun: str) -> subprocess.Popen:
    """A 2-process gloo run in the background (its own session), logging every step."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *torchrun,
        "-m",
        "greedygrow",
        "train-core",
        "--out",
        str(out),
        *TINY,
        f"run.steps={steps}",
        "run.checkpoint_every=5",
        "run.keep=2",
        f"data.text_cache_dir={text_cache}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
    )


def _workers(launcher: subprocess.Popen) -> list[int]:
    """The pids of torchrun's worker processes."""
    found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _wait_for_state(run: Path, step: int, launcher: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not state_path(run, step).exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.02)


def _finish(launcher: subprocess.Popen) -> str:
    try:
        return launcher.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail(f"hung:\n{launcher.communicate()[1][-3000:]}")


@pytest.fixture(scope="module")
def long_single(single, tmp_path_factory) -> Path:
    """The uninterrupted 1-process reference of the 2-process runs below (LONG steps)."""
    run = tmp_path_factory.mktemp("long") / "run"
    _run(run, 1, single[1], f"run.steps={LONG}", "run.checkpoint_every=5", "run.keep=2")
    return run


LONG = 40


def test_sigusr1_to_one_worker_saves_on_every_rank_and_exits_0(single, long_single, tmp_path):
    run = tmp_path / "preempted"
    launcher = _launch(run, single[1], LONG)
    _wait_for_state(run, 5, launcher)
    os.kill(_workers(launcher)[-1], signal.SIGUSR1)  # SLURM's --signal, to one rank only
    stderr = _finish(launcher)
    assert launcher.returncode == 0, stderr[-3000:]
    stopped = max(s for s, _ in list_states(run))
    assert 5 <= stopped < LONG
    assert stderr.count(f"SIGUSR1 received: training state saved at step {stopped}") == 2
    resumed = _run(run, 2, single[1], f"run.steps={LONG}", "run.checkpoint_every=5", "run.keep=2")
    assert f"resuming {run} from step {stopped}" in resumed.stderr
    _assert_same_run(run, long_single)


def test_a_worker_killed_under_max_restarts_is_restarted_and_resumes(single, long_single, tmp_path):
    run = tmp_path / "elastic"
    launcher = _launch(run, single[1], LONG, "--max-restarts=1")
    _wait_for_state(run, 5, launcher)
    os.kill(_workers(launcher)[-1], signal.SIGKILL)  # a worker lost mid-run
    stderr = _finish(launcher)
    assert launcher.returncode == 0, stderr[-3000:]
    resumed = [
        int(x) for x in re.findall(rf"resuming {re.escape(str(run))} from step (\d+)", stderr)
    ]
    assert len(resumed) == 1 and resumed[0] >= 5  # rank 0 of the restarted attempt says so
    _assert_same_run(run, long_single)


def test_fsdp2_posthoc_ema_profiles_match_one_process(single, tmp_path):
    posthoc = (
        "optim.posthoc_ema=[0.05,0.1]",
        "optim.ema_sigma_rel=0.08",
        "run.ema_snapshot_every=2",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1, single[1], *posthoc)
    _run(two, 2, single[1], "run.parallel=fsdp", *posthoc)
    _assert_same_run(two, one)
    for step in (2, STEPS):
        a, b = (load_file(r / "ema" / f"ema-{step:08d}.safetensors") for r in (one, two))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
