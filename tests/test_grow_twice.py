"""Growing a grown run again (docs/training.md, Growing again): its core and the shell levels at
the resolutions both shells share are kept, bit for bit, optionally frozen."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from greedygrow.checkpoint import CheckpointMismatch, export_model
from greedygrow.cli import main
from greedygrow.config import (
    ConfigError,
    grow_config,
    load_config,
    shell_config,
    train_core_config,
)
from greedygrow.grow import grow, inherited_shell_keys
from greedygrow.model import CoreConfig, ShellConfig, UViT
from greedygrow.state import list_states, load_state, state_path
from greedygrow.train import train
from test_train import _history

CORE = CoreConfig(width=32, depth=1, heads=2, grid=4, text_dim=16, text_len=8, fourier_dim=16)
WIDTH = {8: 16, 16: 8, 32: 8, 64: 8}  # channels of the level of each side, as a shell family


def grown(resolution: int, **kw) -> ShellConfig:
    """A grown shell on the 4×4 grid whose channels, as a family's, depend on each level's side."""
    sides = [resolution >> i for i in range((resolution // 4).bit_length() - 1)]
    fields = dict(channels=tuple(WIDTH[r] for r in sides), blocks=(1,) * len(sides))
    return ShellConfig(kind="grown", resolution=resolution, grid=4, norm_groups=8, **fields | kw)


def _inputs(resolution: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 3, resolution, resolution, generator=g),
        torch.linspace(-4, 4, batch),
        torch.randn(batch, 5, CORE.text_dim, generator=g),
        torch.ones(batch, 5, dtype=torch.bool),
        torch.randn(batch, CORE.text_dim, generator=g),
    )


@pytest.fixture
def source(tmp_path) -> tuple[Path, UViT]:
    """An exported grown UViT at 16 px whose every weight (zero-initialised exits too) is
    non-trivial, so an equality with it cannot hold by accident."""
    torch.manual_seed(0)
    model = UViT(CORE, grown(16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / "grown-16"
    export_model(run, model, {"step": 100})
    return run, model


def _moved(name: str, k: int) -> str | None:
    """Where a 16 px shell tensor goes in a shell 2^k times larger (None: not kept), by hand."""
    module, index, *rest = name.split(".")
    if module in ("entry", "exit", "exit_norm"):
        return None if k else name
    if module in ("down", "downsample"):
        return ".".join([module, str(int(index) + k), *rest])
    return name


def test_level_mapping_shifts_encoder_levels_and_keeps_decoder_levels():
    assert inherited_shell_keys(grown(16), grown(64)) == {
        "to_core": "to_core",
        "from_core": "from_core",
        "down.2": "down.0",
        "down.3": "down.1",
        "downsample.2": "downsample.0",
        "up.0": "up.0",
        "up.1": "up.1",
        "upsample.0": "upsample.0",
    }
    whole = inherited_shell_keys(grown(16), grown(16))
    assert {"entry", "exit_norm", "exit", "down.0", "down.1"} <= whole.keys()
    assert all(new == old for new, old in whole.items())


@pytest.mark.parametrize("resolution", [32, 64])
def test_inherited_levels_bit_identical_after_growing(source, resolution):
    run, small = source
    torch.manual_seed(3)
    model = grow(run, None, grown(resolution), "greedy")
    torch.manual_seed(3)
    fresh = UViT(CORE, grown(resolution)).shell.state_dict()
    k = int(math.log2(resolution // 16))
    old, new = small.shell.state_dict(), model.shell.state_dict()
    kept = {_moved(name, k): name for name in old if _moved(name, k) is not None}
    assert len(kept) == len(old) - 6  # all but entry, exit_norm and exit (weight, bias each)
    for name, tensor in new.items():
        expected = old[kept[name]] if name in kept else fresh[name]  # the new levels: fresh
        assert torch.equal(tensor, expected), name
    core = small.core.state_dict()
    assert all(torch.equal(v, core[name]) for name, v in model.core.state_dict().items())


def test_growing_at_the_same_resolution_keeps_the_whole_shell_and_the_function(source):
    run, small = source
    model = grow(run, None, grown(16), "greedy").eval()
    same = small.state_dict()
    assert all(torch.equal(v, same[name]) for name, v in model.state_dict().items())
    with torch.no_grad():
        out = model(*_inputs(16))
        assert out.abs().mean() > 0.05 and torch.equal(out, small(*_inputs(16)))


def test_a_same_resolution_grow_with_another_shell_config_warns_it_starts_elsewhere(source, caplog):
    run, _ = source
    with caplog.at_level(logging.WARNING):
        grow(run, None, grown(16, core_logsnr_shift=1.0), "greedy")
    assert "does not start as that run's" in caplog.text
    assert "core_logsnr_shift: checkpoint 0.0 vs requested 1.0" in caplog.text


def test_growing_into_other_channels_is_refused_naming_each_tensor_and_both_shapes(source):
    run, _ = source
    with pytest.raises(CheckpointMismatch) as info:
        grow(run, None, grown(32, channels=(8, 8, 24)), "greedy")  # the 8 px level: 16 → 24
    msg = str(info.value)
    assert "down.2.0.conv1.weight [24, 24, 3, 3], from source down.1.0.conv1.weight [16, 16" in msg
    assert ("to_core.weight", (32, 64, 1, 1), (32, 96, 1, 1)) in info.value.mismatched
    assert "Grow with the shell family and channels of the source" in msg
    assert not info.value.missing and not info.value.unexpected


def test_growing_with_more_blocks_in_a_kept_level_is_refused_naming_the_missing_tensors(source):
    run, _ = source
    with pytest.raises(CheckpointMismatch) as info:
        grow(run, None, grown(32, blocks=(1, 2, 1)), "greedy")  # the 16 px level: 1 → 2 blocks
    missing = info.value.missing  # the second block of the 16 px level, encoder and decoder
    assert missing and all(k.startswith(("down.1.1.", "up.1.1.")) for k in missing)
    assert "missing in the source: down.1.1.conv1.weight [8, 8, 3, 3]" in str(info.value)


def test_growing_a_grown_run_to_a_lower_resolution_or_with_an_inner_shell_is_refused(source):
    run, _ = source
    with pytest.raises(ValueError, match=r"grows only to its own resolution \(16 px\) or higher"):
        grow(run, None, grown(8), "greedy")
    shallow = ShellConfig(kind="shallow", resolution=8, grid=4, channels=(16,), norm_groups=8)
    with pytest.raises(ValueError, match=r"use grow\.init=fresh"):
        grow(run, None, grown(32, inner=shallow), "greedy")


# ---------------------------------------------------------------------------------------------
# train-core → grow to 2× → grow again to 4×, through the trainer and the command line

TINY = [
    "model.core=cpu-tiny",
    "model.core_overrides.depth=1",
    "model.core_overrides.grid=4",
    "model.resolution=8",
    "data.count=200",
    "run.batch_size=4",
    "run.log_every=1",
    "run.sample_every=0",
    "run.progress=false",
    "optim.warmup_steps=2",
    "optim.lr=1e-3",
    "run.deterministic=true",
]
GROW = [item for item in TINY if not item.startswith(("model.core", "model.resolution"))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"data.text_cache_dir={tmp_path_factory.mktemp('text-cache')}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    """A 2-step core at 8 px, grown jointly to 16 px (2 steps), then grown from the command line
    to 32 px: unfreeze after 2 of 3 steps, inherited levels frozen, a state after every step."""
    root = tmp_path_factory.mktemp("twice")
    core = train(train_core_config(None, [*TINY, "run.steps=2", cache]), root / "core")
    cfg = grow_config(str(core), 16, "joint", None, None, [*GROW, "run.steps=2", cache])
    twice = [*GROW, "run.steps=3", "run.checkpoint_every=1", "run.keep=10", cache]
    args = ["--resolution", "32", "--mode", "unfreeze", "--freeze-steps", "2"]
    args += ["--out", str(root / "g32"), *twice, "grow.freeze_inherited=true"]
    with pytest.raises(SystemExit) as done:
        main(["grow", "--core", str(train(cfg, root / "g16")), *args])
    assert done.value.code == 0
    return {"core": core, "g16": root / "g16", "g32": root / "g32"}


def _state_model(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_state(state_path(run, step))["model"]


def test_growing_a_grown_run_from_the_command_line_keeps_its_core(runs):
    cfg = load_config(runs["g32"] / "config.yaml")
    assert cfg.model.core == "cpu-tiny" and cfg.model.core_overrides["grid"] == 4  # via g16
    assert cfg.data.min_native == 32 and cfg.diffusion.schedule == "shifted"
    g16 = load_file(runs["g16"] / "model.safetensors")
    phase1 = load_file(runs["core"] / "model.safetensors")
    after_one_step = _state_model(runs["g32"], 1)  # the core is frozen for 2 steps
    core = [k for k in g16 if k.startswith("core.")]
    assert not all(torch.equal(g16[k], phase1[k]) for k in core)  # g16 trained its core ...
    assert all(torch.equal(after_one_step[k], g16[k]) for k in core)  # ... which g32 keeps


def test_freeze_inherited_keeps_the_kept_levels_while_new_levels_and_unfrozen_core_train(runs):
    run, g16 = runs["g32"], load_file(runs["g16"] / "model.safetensors")
    keys = inherited_shell_keys(
        shell_config(load_config(runs["g16"] / "config.yaml")),
        shell_config(load_config(run / "config.yaml")),
    )
    kept = {  # g32 tensor → the g16 tensor it inherits
        f"shell.{new}{name[len(old) + 6 :]}": name
        for new, old in keys.items()
        for name in g16
        if name.startswith(f"shell.{old}.")
    }
    assert len(kept) > 10
    states = [_state_model(run, step) for step in (1, 2, 3)]
    exports = [load_file(run / f) for f in ("model-raw.safetensors", "model.safetensors")]
    for model in [*states, *exports]:  # trained weights after each step, and their EMA
        assert all(torch.equal(model[k], g16[v]) for k, v in kept.items())
    assert not torch.equal(states[0]["shell.entry.weight"], states[2]["shell.entry.weight"])
    core = [k for k in g16 if k.startswith("core.")]
    assert all(torch.equal(states[1][k], g16[k]) for k in core)  # frozen for 2 steps ...
    assert not all(torch.equal(states[2][k], g16[k]) for k in core)  # ... then trained
    optimizer = load_state(state_path(run, 3))["optimizer"]["state"]
    optimized = {str(k) for k in optimizer}
    assert any(k.startswith("core.") for k in optimized)
    assert any(k.startswith("shell.entry.") for k in optimized)
    assert not optimized & set(kept)


def test_grow_twice_run_with_frozen_inherited_levels_resumes_with_the_same_losses(runs, tmp_path):
    reference = runs["g32"]
    run = tmp_path / "killed"
    shutil.copytree(reference, run)
    for step, path in list_states(run):
        if step > 1:
            shutil.rmtree(path)  # as a run killed right after its state at step 1
    train(load_config(reference / "config.yaml"), run)  # the same command again
    assert _history(run) == _history(reference)  # loss, lr, grad_norm, core_frozen, core_drift
    a, b = load_file(run / "model-raw.safetensors"), load_file(reference / "model-raw.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_token_logsnr_of_a_second_growth_is_shifted_against_the_phase1_resolution(runs, cache):
    cfg = grow_config(
        str(runs["g16"]), 32, "greedy", None, None, [*GROW, cache, "grow.core_logsnr=token"]
    )
    assert shell_config(cfg).core_logsnr_shift == pytest.approx(2 * math.log(32 / 8))


def test_preserve_and_freeze_inherited_are_refused_where_they_do_not_apply(runs, tmp_path, cache):
    with pytest.raises(ConfigError, match=r"is a grown run: use grow\.init=fresh"):
        grow_config(
            str(runs["g16"]), 32, "greedy", None, None, [*GROW, cache, "grow.init=preserve"]
        )
    frozen = [*GROW, cache, "grow.freeze_inherited=true"]
    with pytest.raises(ConfigError, match="freezes the shell levels kept from a grown run"):
        grow_config(str(runs["core"]), 16, "greedy", None, None, frozen)
    with pytest.raises(ConfigError, match="mode other than scratch, got mode=scratch"):
        grow_config(str(runs["g16"]), 32, "scratch", None, None, frozen)
    with pytest.raises(ConfigError, match="freezes the shell levels kept from a grown run"):
        train_core_config(None, [*TINY, cache, "grow.freeze_inherited=true"])
