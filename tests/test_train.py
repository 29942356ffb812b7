"""The trainer: both phases, the four grow modes, resume after kill -9, refusals before work."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from greedygrow.checkpoint import CheckpointMismatch, load_core
from greedygrow.cli import main
from greedygrow.config import (
    ConfigError,
    core_config,
    grow_config,
    load_config,
    shell_config,
    train_core_config,
)
from greedygrow.data import WebDatasetStream, write_dataset
from greedygrow.distributed import Env
from greedygrow.model import UViT
from greedygrow.run_folder import truncate_metrics
from greedygrow.state import list_states, load_state, state_path
from greedygrow.train import train
from greedygrow.trainable import Trainable, param_groups

# A core small enough for a CPU step in milliseconds: 4×4 grid, 8 px shallow / 16 px grown.
TINY = [
    "model.core_overrides.width=32",
    "model.core_overrides.depth=1",
    "model.core_overrides.heads=2",
    "model.core_overrides.grid=4",
    "model.core_overrides.fourier_dim=32",
    "model.resolution=8",
    "model.shell_overrides.channels=[16]",
    "data.count=200",
    "run.batch_size=4",
    "run.log_every=1",
    "run.sample_every=0",
    "run.sample_steps=2",
    "run.sample_per_prompt=1",
    "run.sample_prompts=[a red circle]",
    "run.progress=false",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "run.deterministic=true",
]
GROW = [
    "model.shell_overrides.channels=[16,16]",
    "model.shell_overrides.blocks=[1,1]",
    "data.count=400",
    "run.batch_size=4",
    "run.log_every=1",
    "run.sample_every=0",
    "run.sample_steps=2",
    "run.sample_per_prompt=1",
    "run.sample_prompts=[a red circle]",
    "run.progress=false",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "run.deterministic=true",
]


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, lines)]


def _logged(run: Path, key: str) -> list:
    return [json.loads(x)[key] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _core_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.startswith("core.")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"data.text_cache_dir={tmp_path_factory.mktemp('text-cache')}"


@pytest.fixture(scope="module")
def core_run(tmp_path_factory, cache) -> Path:
    run = tmp_path_factory.mktemp("core")
    train(train_core_config(None, [*TINY, "run.steps=3", "run.sample_every=2", cache]), run)
    return run


def _grow(core_run: Path, out: Path, mode: str, steps: int, cache: str, freeze=None, extra=()):
    cfg = grow_config(
        str(core_run), 16, mode, freeze, None, [*GROW, f"run.steps={steps}", cache, *extra]
    )
    return train(cfg, out), cfg


def test_train_core_writes_a_complete_run_folder(core_run):
    for name in (
        "config.yaml",
        "model.safetensors",
        "model.json",
        "model-raw.safetensors",
        "metrics.jsonl",
    ):
        assert (core_run / name).is_file(), name
    assert [s for s, _ in _losses(core_run)] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in _losses(core_run))
    assert [s for s, _ in list_states(core_run)] == [3]
    assert any((core_run / "tb").iterdir())
    meta = json.loads((core_run / "model.json").read_text())
    assert meta["phase"] == "core" and meta["step"] == 3 and meta["shell"]["kind"] == "shallow"
    grids = sorted(p.name for p in (core_run / "samples").iterdir())
    assert grids == ["step-0000002.png", "step-0000003.png"]  # every 2 steps and the last


def test_rerunning_a_finished_run_returns_without_touching_it(core_run, cache, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in core_run.rglob("*") if p.is_file()}
    monkeypatch.setattr("greedygrow.train.Trainable", None)  # building a model would fail
    train(train_core_config(None, [*TINY, "run.steps=3", "run.sample_every=2", cache]), core_run)
    assert before == {p: p.stat().st_mtime_ns for p in core_run.rglob("*") if p.is_file()}


def test_text_table_and_scene_cache_train_exactly_like_encoding_and_drawing_each_step(
    tmp_path, cache
):
    fast = train(train_core_config(None, [*TINY, "run.steps=3", cache]), tmp_path / "fast")
    per_step = [*TINY, "run.steps=3", "data.text_table_mb=0", "data.scene_cache_mb=0", cache]
    slow = train(train_core_config(None, per_step), tmp_path / "slow")
    assert _losses(fast) == _losses(slow)
    assert list(fast.glob("scenes/scenes-8px-*/images.u8")) and not (slow / "scenes").exists()


def test_grow_keeps_core_weights(core_run, cache):
    cfg = grow_config(str(core_run), 16, "joint", None, None, [*GROW, "run.steps=1", cache])
    t = Trainable(cfg, Env(0, 1, torch.device("cpu")), 0, None)
    _, core = load_core(core_run)
    grown = t.model.core.state_dict()
    assert grown.keys() == core.keys()
    assert all(torch.equal(grown[k], core[k]) for k in core)
    assert t.model.shell_config.kind == "grown" and t.model.shell_config.resolution == 16


def test_greedy_leaves_core_bit_identical_after_training(core_run, tmp_path, cache):
    run, cfg = _grow(core_run, tmp_path / "greedy", "greedy", 3, cache)
    assert cfg.data.min_native == 16 and cfg.grow.freeze_steps == -1
    before = _core_tensors(core_run / "model.safetensors")
    for exported in ("model.safetensors", "model-raw.safetensors"):
        after = _core_tensors(run / exported)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), exported
    state = load_state(state_path(run, 3))
    optimized = set(state["optimizer"]["state"])
    assert optimized and not any(str(k).startswith("core.") for k in optimized)
    assert all(_logged(run, "core_frozen"))


@pytest.fixture(scope="module")
def unfreeze_run(core_run, tmp_path_factory, cache) -> Path:
    """4 steps, the core frozen for 2, a checkpoint after every step (log_every=1)."""
    out = tmp_path_factory.mktemp("unfreeze") / "run"
    extra = ["run.checkpoint_every=1", "run.keep=10"]
    return _grow(core_run, out, "unfreeze", 4, cache, freeze=2, extra=extra)[0]


def _history(run: Path) -> list[dict]:
    """RUN/metrics.jsonl without the timings, which differ from one attempt to the next."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    timings = ("time", "images_per_s", "wall_s", "cpu_s", "total_wall_s", "total_cpu_s")
    return [{k: v for k, v in json.loads(x).items() if k not in timings} for x in lines]


def _killed_after(run: Path, step: int, out: Path) -> Path:
    """A copy of `run` as a run killed right after its checkpoint at `step`."""
    shutil.copytree(run, out)
    for s, path in list_states(out):
        if s > step:
            shutil.rmtree(path)
    return out


def _assert_resumes_like(run: Path, reference: Path, step: int) -> None:
    assert max(s for s, _ in list_states(run)) == step
    cfg = load_config(reference / "config.yaml")
    train(cfg, run)  # the same command again
    assert _losses(run) == _losses(reference)  # exactly, step by step
    assert _history(run) == _history(reference)  # lr, grad_norm, core_frozen, core_drift too
    a, b = load_file(run / "model-raw.safetensors"), load_file(reference / "model-raw.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unfreeze_changes_core_only_after_freeze_steps(unfreeze_run, core_run):
    run = unfreeze_run
    _, original = load_core(core_run)

    def core_at(step):
        model = load_state(state_path(run, step))["model"]
        return {k[5:]: v for k, v in model.items() if k.startswith("core.")}

    for step in (1, 2):
        assert all(torch.equal(core_at(step)[k], original[k]) for k in original), step
    for step in (3, 4):
        assert not all(torch.equal(core_at(step)[k], original[k]) for k in original), step
    assert _logged(run, "core_frozen") == [True, True, False, False]


@pytest.mark.parametrize("killed_at", [2, 3])  # the unfreeze step (frozen state), one after
def test_unfreeze_run_killed_at_or_after_its_unfreeze_step_resumes_with_the_same_losses(
    unfreeze_run, tmp_path, killed_at
):
    run = _killed_after(unfreeze_run, killed_at, tmp_path / "killed")
    state = load_state(state_path(run, killed_at))
    in_optimizer = {str(k).split(".")[0] for k in state["optimizer"]["state"]}
    assert in_optimizer == ({"shell"} if killed_at == 2 else {"shell", "core"})
    _assert_resumes_like(run, unfreeze_run, killed_at)


@pytest.mark.parametrize("mode", ["joint", "greedy"])
def test_joint_and_greedy_runs_resume_from_a_checkpoint_with_the_same_losses(
    core_run, tmp_path, cache, mode
):
    extra = ["run.checkpoint_every=1", "run.keep=10"]
    reference, _ = _grow(core_run, tmp_path / "reference", mode, 3, cache, extra=extra)
    assert all(("core_drift" in line) == (mode == "joint") for line in _history(reference))
    run = _killed_after(reference, 1, tmp_path / "killed")
    _assert_resumes_like(run, reference, 1)


def test_core_drift_is_zero_while_frozen_then_grows_and_is_exported(unfreeze_run, core_run):
    drift = _logged(unfreeze_run, "core_drift")
    assert drift[:2] == [0.0, 0.0] and 0 < drift[2] < drift[3] < 1
    trained = load_file(unfreeze_run / "model-raw.safetensors")
    _, phase1 = load_core(core_run)  # the core's tensors are all parameters
    moved = sum((trained[f"core.{k}"] - v).square().sum() for k, v in phase1.items())
    size = sum(v.square().sum() for v in phase1.values())
    assert drift[3] == pytest.approx(float((moved / size).sqrt()), rel=1e-5)  # ‖θ − θ₁‖/‖θ₁‖
    assert json.loads((unfreeze_run / "model.json").read_text())["core_drift"] == drift[3]


def test_core_lr_multiplier_applies_only_to_a_phase_1_core_that_goes_on_training(core_run, cache):
    def core_mults(cfg):
        groups = param_groups(UViT(core_config(cfg), shell_config(cfg)), cfg, core=True)
        return {g["lr_mult"] for g in groups if g["name"] == "core"}

    slow = ["optim.core_lr_multiplier=0.1", cache]
    assert core_mults(train_core_config(None, [*TINY, *slow])) == {1.0}
    for mode, expected in (("joint", 0.1), ("unfreeze", 0.1), ("scratch", 1.0)):
        cfg = grow_config(
            str(core_run), 16, mode, 1 if mode == "unfreeze" else None, None, [*GROW, *slow]
        )
        assert core_mults(cfg) == {expected}, mode


def test_scratch_mode_does_not_load_the_core(core_run, tmp_path, cache):
    cfg = grow_config(str(core_run), 16, "scratch", None, None, [*GROW, "run.steps=1", cache])
    t = Trainable(cfg, Env(0, 1, torch.device("cpu")), 0, None)
    _, core = load_core(core_run)
    assert not torch.equal(t.model.core.state_dict()["text_proj.weight"], core["text_proj.weight"])


def test_mismatched_core_is_refused_naming_the_tensors(core_run, tmp_path, cache):
    out = tmp_path / "mismatch"
    cfg = grow_config(
        str(core_run),
        16,
        "greedy",
        None,
        None,
        [
            *GROW,
            "run.steps=1",
            cache,
            "model.core=cpu-tiny",
            "model.core_overrides.width=64",
            "model.core_overrides.heads=2",
            "model.core_overrides.grid=4",
            "model.core_overrides.depth=1",
            "model.core_overrides.fourier_dim=32",
        ],
    )
    with pytest.raises(CheckpointMismatch, match=r"width.*32.*64"):
        train(cfg, out)
    assert not (out / "config.yaml").exists()  # refused before the run folder is written


def test_unknown_config_key_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["train-core", "--out", str(out), *TINY, "run.stepz=3"])
    assert e.value.code == 2 and not out.exists()
    assert time.perf_counter() - tic < 5
    assert "run.stepz" in capsys.readouterr().err


def test_unreachable_resolution_is_refused_before_any_work(core_run, tmp_path, capsys):
    out = tmp_path / "grown"
    with pytest.raises(SystemExit) as e:
        main(["grow", "--core", str(core_run), "--resolution", "24", "--out", str(out), *GROW])
    assert e.value.code == 2 and not out.exists()
    assert "model.resolution=24 does not work" in capsys.readouterr().err


def test_resume_refuses_a_different_config(core_run, cache):
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train(
            train_core_config(
                None, [*TINY, "run.steps=3", "run.sample_every=2", cache, "optim.lr=5e-4"]
            ),
            core_run,
        )


def test_resume_refuses_a_run_whose_preset_changed_since_it_started(core_run, tmp_path, cache):
    run = tmp_path / "copy"
    shutil.copytree(core_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["core"]["heads"] *= 2  # as if the preset had twice the heads when the run started
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"another architecture[\s\S]*core\.heads"):
        train(train_core_config(None, [*TINY, "run.steps=3", "run.sample_every=2", cache]), run)


def test_extending_an_unfreeze_run_keeps_its_unfreeze_step(core_run, tmp_path, cache, caplog):
    cosine = ["optim.schedule=cosine"]
    run, first = _grow(core_run, tmp_path / "u", "unfreeze", 4, cache, extra=cosine)
    assert first.grow.freeze_steps == 1  # the default, 4 // 4
    with caplog.at_level(logging.WARNING):
        _grow(core_run, run, "unfreeze", 8, cache, extra=cosine)
    assert load_config(run / "config.yaml").grow.freeze_steps == 1  # not 8 // 4
    assert _logged(run, "core_frozen") == [True] + [False] * 7
    assert "learning rate jumps" in caplog.text
    _grow(core_run, run, "unfreeze", 8, cache, extra=cosine)  # the same command again: resumes
    with pytest.raises(ConfigError, match=r"grow\.freeze_steps: 1 -> 3"):
        _grow(core_run, run, "unfreeze", 8, cache, freeze=3, extra=cosine)  # an explicit change


def test_a_greedy_run_goes_on_unfrozen_like_an_unfreeze_run_released_at_that_step(
    unfreeze_run, core_run, tmp_path, cache, caplog
):
    extra = ["run.checkpoint_every=1", "run.keep=10"]
    run, _ = _grow(core_run, tmp_path / "greedy", "greedy", 2, cache, extra=extra)
    with pytest.raises(ConfigError, match=r"release the core at step 2 at the earliest"):
        _grow(core_run, run, "unfreeze", 8, cache, freeze=1, extra=extra)  # default 8 // 4
    with caplog.at_level(logging.INFO):
        _grow(core_run, run, "unfreeze", 4, cache, extra=extra)  # released at 2 by default
    assert "in unfreeze mode: the core trains from step 2" in caplog.text
    cfg = load_config(run / "config.yaml")
    assert (cfg.grow.mode, cfg.grow.freeze_steps) == ("unfreeze", 2)
    assert _losses(run) == _losses(unfreeze_run)  # the reference: unfreeze, freeze_steps=2
    assert _history(run)[2:] == _history(unfreeze_run)[2:]  # lr, grad_norm, core_drift
    a, b = (
        load_file(run / "model-raw.safetensors"),
        load_file(unfreeze_run / "model-raw.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_latest_checkpoint_falls_back_with_a_warning(tmp_path, cache, caplog):
    over = [*TINY, "run.steps=4", "run.checkpoint_every=2", "run.keep=3", cache]
    run = train(train_core_config(None, over), tmp_path / "run")
    reference = _losses(run)
    shard = next(state_path(run, 4).glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        train(train_core_config(None, over), run)
    assert any(
        "unreadable" in r.getMessage() and "step-00000004" in r.getMessage() for r in caplog.records
    )
    assert _losses(run) == reference  # steps 3-4 retrained from step 2, identically
    assert load_state(state_path(run, 4))["step"] == 4  # rewritten whole


def test_training_on_a_folder_skips_images_that_fail_to_decode(tmp_path, cache, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (24, 16), colour).save(data / f"good{i}.png")
        (data / f"good{i}.txt").write_text(f"a {colour} picture")
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(data / "bad.jpg", quality=95)
    (data / "bad.jpg").write_bytes((data / "bad.jpg").read_bytes()[:900])  # valid header only
    (data / "bad.txt").write_text("a truncated picture")
    over = [*TINY, "data.source=folder", f"data.path={data}", "run.batch_size=1", cache]
    with caplog.at_level(logging.WARNING):
        run = train(train_core_config(None, [*over, "run.steps=8"]), tmp_path / "run")
    assert [s for s, _ in _losses(run)] == list(range(1, 9))  # every step trained
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in _losses(run))
    assert "bad.jpg" in caplog.text  # the batch of only the truncated image was passed over


def test_webdataset_run_resumes_without_replaying_the_stream(tmp_path, cache, monkeypatch):
    write_dataset(tmp_path / "shards", 24, resolution=16, fmt="webdataset", shard_size=8)
    over = [*TINY, "data.source=webdataset", f"data.path={tmp_path / 'shards'}", cache]
    run = train(train_core_config(None, [*over, "run.steps=2"]), tmp_path / "run")
    epochs, decoded = [], []
    monkeypatch.setattr(WebDatasetStream, "set_epoch", lambda self, e: epochs.append(e))
    decode = WebDatasetStream._decode
    monkeypatch.setattr(
        WebDatasetStream, "_decode", lambda self, *a: decoded.append(1) or decode(self, *a)
    )
    train(train_core_config(None, [*over, "run.steps=4"]), run)  # extend the run: resume at 2
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4]
    assert epochs == [2]  # a fresh stream seeded by the resume step ...
    assert len(decoded) == 2 * 4  # ... not the 2 batches read before, replayed first


def test_resume_drops_log_lines_past_the_checkpoint_and_a_half_written_one(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    metrics.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-write
    truncate_metrics(metrics, 2)
    assert metrics.read_text() == "\n".join(lines[:2]) + "\n"


def test_bf16_and_gradient_checkpointing_train(tmp_path, cache):
    run = train(
        train_core_config(
            None,
            [
                *TINY,
                "run.steps=2",
                "run.precision=bf16",
                "model.gradient_checkpointing=true",
                cache,
            ],
        ),
        tmp_path / "bf16",
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in _losses(run))


def test_sample_command_writes_a_labelled_grid(core_run, tmp_path):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "sample",
                "--model",
                str(core_run),
                "--out",
                str(out),
                "a red circle",
                "two blue squares",
                "--steps",
                "2",
                "--per-prompt",
                "3",
            ]
        )
    assert e.value.code == 0
    img = Image.open(out)
    assert img.height > 2 * 96 and img.width >= 3 * 96  # two rows of three (upscaled) cells


def test_sample_flags_reach_the_sampler(core_run, tmp_path):
    def grid(name: str, *flags: str) -> torch.Tensor:
        out = tmp_path / f"{name}.png"
        args = ["sample", "--model", str(core_run), "--out", str(out), "a red circle"]
        with pytest.raises(SystemExit) as e:
            main([*args, "--steps", "3", *flags])
        assert e.value.code == 0
        return torch.from_numpy(np.array(Image.open(out))).float()

    unguided = grid("w1", "--guidance", "1")
    never = grid("interval", "--guidance", "3", "--guidance-interval", "20", "30")  # λ > 15
    assert torch.equal(never, unguided)  # guidance outside every step's λ is no guidance
    assert not torch.equal(grid("w3", "--guidance", "3"), unguided)
    fp32 = grid("fp32", "--guidance", "1", "--no-bf16")  # bf16 is the default where native
    bf16 = grid("bf16", "--guidance", "1", "--bf16")
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().mean() < 8


def _resumable(steps: int, cache: str) -> list[str]:
    return [*TINY, f"run.steps={steps}", "run.checkpoint_every=5", "run.keep=3", cache]


def _cli(run: Path, steps: int, cache: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "greedygrow",
        "train-core",
        "--out",
        str(run),
        *_resumable(steps, cache),
    ]


def uninterrupted(run: Path, steps: int, cache: str) -> Path:
    """The run `_cli` starts, trained in this process as its subprocesses are (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        return train(train_core_config(None, _resumable(steps, cache)), run)
    finally:
        torch.set_num_threads(threads)


def test_kill_9_then_rerun_resumes_with_the_uninterrupted_losses(tmp_path, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 40
    reference = uninterrupted(tmp_path / "reference", steps, cache)
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(run, steps, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not state_path(run, 10).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in list_states(run))
    assert 10 <= killed_at < steps, "the run finished before it could be killed"
    done = subprocess.run(_cli(run, steps, cache), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {killed_at}" in done.stderr
    assert _losses(run) == _losses(reference)
    a, b = load_file(run / "model-raw.safetensors"), load_file(reference / "model-raw.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, cache):
    eager = train(train_core_config(None, [*TINY, "run.steps=2", cache]), tmp_path / "eager")
    compiled = train(
        train_core_config(None, [*TINY, "run.steps=2", "model.compile=true", cache]),
        tmp_path / "compiled",
    )
    assert [s for s, _ in _losses(compiled)] == [1, 2]
    for (_, a), (_, b) in zip(_losses(compiled), _losses(eager), strict=True):
        assert a == pytest.approx(b, rel=1e-3)
