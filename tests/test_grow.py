"""Growing a phase-1 core into a new shell; freezing the core; the four modes."""

from __future__ import annotations

import copy

import pytest
import torch

from greedygrow.checkpoint import CheckpointMismatch, export_model
from greedygrow.config import GROW_MODES
from greedygrow.grow import freeze_core, grow, unfreeze_core
from greedygrow.model import CoreConfig, ShellConfig, UViT


def tiny_core(**overrides) -> CoreConfig:
    fields = dict(width=32, depth=2, heads=2, grid=4, text_dim=16, text_len=8, fourier_dim=16)
    return CoreConfig(**{**fields, **overrides})


SHALLOW = ShellConfig(
    kind="shallow", resolution=8, grid=4, channels=(16,), blocks=(1,), norm_groups=8
)
GROWN = ShellConfig(
    kind="grown", resolution=16, grid=4, channels=(8, 16), blocks=(1, 1), norm_groups=8
)


def _inputs(model: UViT, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    r, e = model.shell_config.resolution, model.core_config.text_dim
    return (
        torch.randn(batch, 3, r, r, generator=g),
        torch.linspace(-5, 5, batch),
        torch.randn(batch, 5, e, generator=g),
        torch.ones(batch, 5, dtype=torch.bool),
        torch.randn(batch, e, generator=g),
    )


@pytest.fixture
def phase1(tmp_path):
    """An exported Shallow-UViT whose core differs from any fresh initialisation."""
    torch.manual_seed(0)
    model = UViT(tiny_core(), SHALLOW)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "core-run"
    export_model(run, model, {"step": 100})
    return run, model


def _perturb_shell(model: UViT) -> None:
    """Make the zero-initialised shell exits non-zero, so gradients reach the core."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.shell.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _core_equal(a: UViT, b: UViT) -> bool:
    sa, sb = a.core.state_dict(), b.core.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", ["greedy", "unfreeze", "joint"])
def test_grow_keeps_core_weights(phase1, mode):
    run, core_model = phase1
    grown = grow(run, tiny_core(), GROWN, mode)
    assert grown.shell_config == GROWN
    assert _core_equal(grown, core_model)
    with torch.no_grad():
        assert torch.isfinite(grown(*_inputs(grown))).all()


def test_grow_takes_checkpoint_core_config_when_none_given(phase1):
    run, core_model = phase1
    grown = grow(run, None, GROWN, "greedy")
    assert grown.core_config == core_model.core_config
    assert _core_equal(grown, core_model)


def test_grow_leaves_shell_freshly_initialised(phase1):
    run, _ = phase1
    torch.manual_seed(3)
    grown = grow(run, tiny_core(), GROWN, "greedy")
    torch.manual_seed(3)
    fresh = UViT(tiny_core(), GROWN)
    for k, v in fresh.shell.state_dict().items():
        assert torch.equal(grown.shell.state_dict()[k], v), k


def test_scratch_mode_does_not_load_the_core(phase1):
    run, core_model = phase1
    scratch = grow(run, tiny_core(), GROWN, "scratch")
    assert not _core_equal(scratch, core_model)
    different = [
        k
        for k, v in core_model.core.state_dict().items()
        if not torch.equal(scratch.core.state_dict()[k], v)
    ]
    assert len(different) == len(core_model.core.state_dict())  # every tensor was perturbed
    assert grow(None, tiny_core(), GROWN, "scratch").core_config == tiny_core()


def test_grow_refuses_core_of_other_width_naming_tensors_and_shapes(phase1):
    run, _ = phase1
    with pytest.raises(CheckpointMismatch) as info:
        grow(run, tiny_core(width=64, heads=4), GROWN, "greedy")
    msg = str(info.value)
    assert "width: checkpoint 32 vs requested 64" in msg
    assert "heads: checkpoint 2 vs requested 4" in msg
    assert "pos checkpoint [16, 32] vs model [16, 64]" in msg
    assert "blocks.0.attn" in msg
    assert ("pos", (16, 32), (16, 64)) in info.value.mismatched


def test_grow_refuses_core_of_other_depth_naming_missing_tensors(phase1):
    run, _ = phase1
    with pytest.raises(CheckpointMismatch) as info:
        grow(run, tiny_core(depth=3), GROWN, "unfreeze")
    msg = str(info.value)
    assert "depth: checkpoint 2 vs requested 3" in msg
    assert info.value.missing and all(k.startswith("blocks.2.") for k in info.value.missing)
    assert f"missing:    {info.value.missing[0]} [" in msg
    assert not info.value.unexpected and not info.value.mismatched


def test_grow_refuses_core_config_that_differs_only_in_fields(phase1):
    run, _ = phase1
    with pytest.raises(CheckpointMismatch, match="heads: checkpoint 2 vs requested 4"):
        grow(run, tiny_core(heads=4), GROWN, "joint")


def test_grow_needs_a_core_except_in_scratch_mode():
    with pytest.raises(ValueError, match="mode greedy grows a phase-1 core"):
        grow(None, tiny_core(), GROWN, "greedy")
    with pytest.raises(ValueError, match="unknown grow mode 'fast'"):
        grow(None, tiny_core(), GROWN, "fast")


def test_grow_from_missing_run_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors: train it first"):
        grow(tmp_path / "empty", None, GROWN, "greedy")


def test_modes_are_the_papers_four():
    assert set(GROW_MODES) == {"greedy", "unfreeze", "joint", "scratch"}


def test_frozen_core_has_no_grad_params_and_stays_in_eval(phase1):
    run, _ = phase1
    model = grow(run, None, GROWN, "greedy")
    freeze_core(model)
    assert not any(p.requires_grad for p in model.core.parameters())
    assert all(p.requires_grad for p in model.shell.parameters())
    model.train()
    assert model.training and model.shell.training
    assert not any(m.training for m in model.core.modules())
    ema = copy.deepcopy(model)
    ema.train()
    assert not ema.core.training and ema.shell.training
    model.eval()
    model.train(True)
    assert not model.core.training


def test_frozen_core_passes_gradients_to_the_encoder_and_stays_bit_identical(phase1):
    run, core_model = phase1
    model = grow(run, None, GROWN, "greedy")
    _perturb_shell(model)
    freeze_core(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        out = model(*_inputs(model))
        out.square().mean().backward()
        assert all(p.grad is None for p in model.core.parameters())
        entry = next(model.shell.parameters())  # the encoder's entry conv, before the core
        assert entry.grad is not None and entry.grad.abs().sum() > 0
        opt.step()
    assert _core_equal(model, core_model)


def test_unfreezing_restores_grads_and_train_mode(phase1):
    run, core_model = phase1
    model = grow(run, None, GROWN, "unfreeze")
    _perturb_shell(model)
    freeze_core(model)
    model.train()
    unfreeze_core(model)
    assert model.core.training
    assert all(p.requires_grad for p in model.core.parameters())
    model.eval()
    assert not model.core.training
    model.train()
    assert model.core.training
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(*_inputs(model)).square().mean().backward()
    opt.step()
    assert not _core_equal(model, core_model)
