"""How a grown model starts: function-preserving growth (grow.init=preserve) and the log-SNR the
frozen core reads (grow.core_logsnr=token)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from greedygrow.checkpoint import CheckpointMismatch, export_model
from greedygrow.config import (
    ConfigError,
    grow_config,
    save_config,
    shell_config,
    train_core_config,
)
from greedygrow.grow import grow
from greedygrow.model import CoreConfig, ShellConfig, UViT
from greedygrow.run_folder import check_resume

CORE = CoreConfig(width=32, depth=2, heads=2, grid=4, text_dim=16, text_len=8, fourier_dim=16)
SHALLOW = ShellConfig(
    kind="shallow", resolution=8, grid=4, channels=(16,), blocks=(1,), norm_groups=8
)


def grown_shell(resolution: int, **kw) -> ShellConfig:
    levels = (resolution // 4).bit_length() - 1
    return ShellConfig(
        kind="grown",
        resolution=resolution,
        grid=4,
        channels=(8,) * levels,
        blocks=(1,) * levels,
        norm_groups=8,
        **kw,
    )


@pytest.fixture
def phase1(tmp_path):
    """An exported Shallow-UViT at 8 px whose every weight (zero-initialised exits too) is
    non-trivial, so an equality with it cannot hold by accident."""
    torch.manual_seed(0)
    model = UViT(CORE, SHALLOW).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    run = tmp_path / "core-run"
    export_model(run, model, {"step": 100})
    return run, model


def _text(batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 5, CORE.text_dim, generator=g),
        torch.ones(batch, 5, dtype=torch.bool),
        torch.randn(batch, CORE.text_dim, generator=g),
    )


@pytest.mark.parametrize("resolution", [16, 32])
@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_preserving_grow_starts_as_the_shallow_uvit_on_a_downsampled_input(
    phase1, resolution, shift
):
    run, shallow = phase1
    shell = grown_shell(resolution, inner=SHALLOW, core_logsnr_shift=shift)
    model = grow(run, None, shell, "greedy").eval()
    k = resolution // SHALLOW.resolution
    z = torch.randn(3, 3, resolution, resolution, generator=torch.Generator().manual_seed(2))
    logsnr = torch.tensor([-4.0, 0.0, 3.0])
    with torch.no_grad():
        got = model(z, logsnr, *_text(3))
        small = shallow(F.avg_pool2d(z, k), logsnr + shift, *_text(3))
    want = F.interpolate(small, scale_factor=k, mode="nearest")
    assert small.abs().mean() > 0.05  # the phase-1 model computes something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_preserving_grow_keeps_the_phase1_shell_and_learns_the_new_levels(phase1):
    run, shallow = phase1
    model = grow(run, None, grown_shell(16, inner=SHALLOW), "greedy")
    for name, tensor in shallow.shell.state_dict().items():
        assert torch.equal(model.shell.inner.state_dict()[name], tensor), name
    z = torch.randn(2, 3, 16, 16)
    model(z, torch.zeros(2), *_text(2)).square().mean().backward()
    # the zero-initialised entry to the core and exit conv get gradients: the levels join
    assert model.shell.to_core.weight.grad.abs().sum() > 0
    assert model.shell.exit.weight.grad.abs().sum() > 0


def test_preserving_grow_refuses_a_phase1_shell_of_another_shape(phase1):
    run, _ = phase1
    other = ShellConfig(
        kind="shallow", resolution=8, grid=4, channels=(24,), blocks=(1,), norm_groups=8
    )
    with pytest.raises(CheckpointMismatch, match="shallow shell of"):
        grow(run, None, grown_shell(16, inner=other), "greedy")


def test_inner_shell_must_be_shallow_below_the_grown_resolution():
    with pytest.raises(ValueError, match="inner must be a shallow shell"):
        grown_shell(16, inner=grown_shell(8))
    with pytest.raises(ValueError, match="inner must be a shallow shell"):
        grown_shell(16, inner=ShellConfig(kind="shallow", resolution=16, grid=4, norm_groups=8))


def test_shell_config_with_inner_round_trips_through_a_dict():
    shell = grown_shell(16, inner=SHALLOW, core_logsnr_shift=0.5)
    assert ShellConfig.from_dict(shell.to_dict()) == shell


TINY_CORE = [
    "model.core=cpu-tiny",
    "model.core_overrides={grid: 8}",
    "model.resolution=16",
    "run.steps=2",
]


def test_grow_config_links_the_phase1_shell_and_the_token_shift(tmp_path):
    core = tmp_path / "core"
    core.mkdir()
    save_config(train_core_config(None, TINY_CORE), core / "config.yaml")
    cfg = grow_config(str(core), 64, "greedy", None, None, ["grow.init=preserve"])
    assert cfg.grow.core_logsnr == "pixel"
    shell = shell_config(cfg)
    assert shell.inner.kind == "shallow" and shell.inner.resolution == 16
    assert shell.core_logsnr_shift == 0.0
    cfg = grow_config(str(core), 64, "greedy", None, None, ["grow.core_logsnr=token"])
    shell = shell_config(cfg)
    assert shell.inner is None
    assert shell.core_logsnr_shift == pytest.approx(2 * math.log(64 / 16))


def test_scratch_refuses_a_phase1_start(tmp_path):
    with pytest.raises(ConfigError, match="scratch has none"):
        grow_config(None, 64, "scratch", None, None, ["grow.init=preserve", "model.core=cpu-tiny"])


def test_a_grow_run_written_before_the_start_keys_existed_resumes(tmp_path):
    core = tmp_path / "core"
    core.mkdir()
    save_config(train_core_config(None, TINY_CORE), core / "config.yaml")
    cfg = grow_config(str(core), 32, "greedy", None, None, ["run.steps=2"])
    run = tmp_path / "grown"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    text = (run / "config.yaml").read_text()
    old = text.replace("  init: fresh\n", "").replace("  core_logsnr: pixel\n", "")
    assert old != text
    (run / "config.yaml").write_text(old)
    check_resume(cfg, run)  # the missing keys resolve to what such a run did: fresh, pixel
