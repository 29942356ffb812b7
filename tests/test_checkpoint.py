"""Run folders: atomic writes, training states with resume fallback, safetensors export."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from greedygrow.atomic import atomic_write, atomic_write_json
from greedygrow.checkpoint import (
    CheckpointMismatch,
    NonFiniteTensors,
    export_model,
    list_states,
    load_core,
    load_latest_state,
    load_model,
    load_strict,
    nonfinite_tensors,
    read_meta,
    save_state,
    unwrap_model,
)
from greedygrow.model import CoreConfig, ShellConfig, UViT


def tiny_core(**overrides) -> CoreConfig:
    fields = dict(width=32, depth=2, heads=2, grid=4, text_dim=16, text_len=8, fourier_dim=16)
    return CoreConfig(**{**fields, **overrides})


def tiny_shallow() -> ShellConfig:
    return ShellConfig(
        kind="shallow", resolution=8, grid=4, channels=(16,), blocks=(1,), norm_groups=8
    )


def tiny_inputs(model: UViT, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """(z, logsnr, text_tokens, text_mask, text_pooled) for a tiny UViT, seeded."""
    g = torch.Generator().manual_seed(1)
    r, e = model.shell_config.resolution, model.core_config.text_dim
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return (
        torch.randn(batch, 3, r, r, generator=g),
        torch.linspace(-5, 5, batch),
        torch.randn(batch, 5, e, generator=g),
        mask,
        torch.randn(batch, e, generator=g),
    )


def _state(step: int) -> dict:
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "numpy_seed": 7},
        "data": {"epoch": 1, "index": 12},
        "config": {"lr": 1e-3, "name": "x", "betas": (0.9, 0.99), "none": None},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == ["x.bin"]


def test_atomic_write_gives_normal_file_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write(tmp_path / "x.bin", lambda f: f.write(b"x"))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_export_removes_temp_files_of_a_killed_export(tmp_path, tiny_model):
    (tmp_path / ".tmp-model.safetensors.abc").write_bytes(b"killed mid-write")
    (tmp_path / ".tmp-model.json.def").write_bytes(b"killed mid-write")
    export_model(tmp_path, tiny_model, {})
    assert _files(tmp_path) == ["model.json", "model.safetensors"]


def test_atomic_write_json_rejects_non_json_with_clear_error(tmp_path):
    with pytest.raises(TypeError, match=r"cannot write .*meta\.json as JSON"):
        atomic_write_json(tmp_path / "meta.json", {"x": object()})
    assert not (tmp_path / "meta.json").exists()


def test_save_load_state_round_trip(tmp_path):
    state = _state(5)
    path = save_state(tmp_path, 5, state)
    assert path == tmp_path / "state" / "step-00000005.pt"
    step, loaded = load_latest_state(tmp_path)
    assert step == 5
    _assert_same(state, loaded)


def test_load_latest_state_none_without_states(tmp_path):
    assert load_latest_state(tmp_path) is None
    assert load_latest_state(tmp_path / "missing") is None


def test_save_state_keeps_last_k(tmp_path):
    for step in (0, 100, 200, 300, 400):
        save_state(tmp_path, step, {"step": step}, keep=2)
    assert [s for s, _ in list_states(tmp_path)] == [300, 400]
    assert _files(tmp_path / "state") == ["step-00000300.pt", "step-00000400.pt"]
    assert load_latest_state(tmp_path)[1]["step"] == 400


def test_states_order_by_step_not_name(tmp_path):
    save_state(tmp_path, 99_999_999, {"step": 99_999_999})
    save_state(tmp_path, 100_000_000, {"step": 100_000_000})  # one more digit than the pad
    assert load_latest_state(tmp_path)[0] == 100_000_000


def test_no_temp_files_left_after_save(tmp_path):
    save_state(tmp_path, 1, _state(1))
    (tmp_path / "state" / ".tmp-step-00000002.pt.abc").write_bytes(b"killed mid-write")
    save_state(tmp_path, 2, _state(2))
    assert _files(tmp_path / "state") == ["step-00000001.pt", "step-00000002.pt"]


def test_truncated_latest_state_falls_back_with_warning(tmp_path, caplog):
    save_state(tmp_path, 10, _state(10))
    latest = save_state(tmp_path, 20, _state(20))
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="greedygrow.checkpoint"):
        step, state = load_latest_state(tmp_path)
    assert step == 10 and state["step"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(latest) in warnings[0] and "falling back" in warnings[0]


def test_all_states_corrupt_gives_none(tmp_path, caplog):
    save_state(tmp_path, 1, {"step": 1}).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="greedygrow.checkpoint"):
        assert load_latest_state(tmp_path) is None
    assert "step-00000001.pt" in caplog.text


def test_save_state_rejects_unloadable_values_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        save_state(tmp_path, 1, {"rng": {"numpy": np.zeros(3)}})
    assert list_states(tmp_path) == []


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_save_state_rejects_bad_step(tmp_path, step):
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_state(tmp_path, step, {})


def test_load_strict_lists_every_difference():
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = module.state_dict()
    state["0.weight"] = torch.zeros(5, 4)
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as info:
        load_strict(module, state, what="ckpt.pt")
    msg = str(info.value)
    assert "ckpt.pt does not fit Sequential" in msg
    assert "missing:    1.bias [2]" in msg
    assert "unexpected: 2.weight [1]" in msg
    assert "0.weight checkpoint [5, 4] vs model [3, 4]" in msg
    assert info.value.missing == ["1.bias"]
    assert info.value.unexpected == ["2.weight"]
    assert info.value.mismatched == [("0.weight", (5, 4), (3, 4))]
    assert isinstance(info.value, ValueError)


def test_load_strict_accepts_exact_fit():
    module = nn.Linear(4, 3)
    load_strict(module, module.state_dict())


# --------------------------------------------------------------------------- exported models


@pytest.fixture
def tiny_model() -> UViT:
    torch.manual_seed(0)
    model = UViT(tiny_core(), tiny_shallow())
    with torch.no_grad():  # zero-initialised gates/exits would hide a bad reload
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_exported_model_reloads_with_identical_outputs(tmp_path, tiny_model):
    export_model(tmp_path, tiny_model, {"step": 7, "text_encoder": "minilm"})
    assert _files(tmp_path) == ["model.json", "model.safetensors"]
    loaded, meta = load_model(tmp_path)
    assert meta["step"] == 7 and meta["text_encoder"] == "minilm"
    assert meta["core"] == tiny_model.core_config.to_dict()
    assert not loaded.training
    inputs = tiny_inputs(tiny_model)
    with torch.no_grad():
        expected = tiny_model(*inputs)
        got = loaded(*inputs)
    assert torch.equal(expected, got)
    assert expected.abs().sum() > 0


def test_export_raw_and_ema_side_by_side(tmp_path, tiny_model):
    raw = UViT(tiny_core(), tiny_shallow())
    export_model(tmp_path, tiny_model, {"step": 1})
    export_model(tmp_path, raw, {"step": 1}, name="model-raw")
    ema_loaded, _ = load_model(tmp_path, ema=True)
    raw_loaded, _ = load_model(tmp_path, ema=False)
    for k, v in raw.state_dict().items():
        assert torch.equal(raw_loaded.state_dict()[k], v)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(ema_loaded.state_dict()[k], v)


def test_lone_safetensors_file_is_self_describing(tmp_path, tiny_model):
    weights = export_model(tmp_path, tiny_model, {"step": 3})
    lone = tmp_path / "elsewhere" / "core.safetensors"
    lone.parent.mkdir()
    os.replace(weights, lone)
    assert read_meta(lone)["step"] == 3
    model, _ = load_model(lone)
    assert model.state_dict().keys() == tiny_model.state_dict().keys()


def test_export_handles_tied_tensors(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight

    model = Tied()
    export_model(tmp_path, model, {"core": {}, "shell": {}})
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["a.weight"], loaded["b.weight"])
    fresh = Tied()
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.a.weight, model.a.weight)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_export_looks_through_compile_wrapper(tmp_path, tiny_model):
    compiled = torch.compile(tiny_model)
    assert unwrap_model(compiled) is tiny_model
    export_model(tmp_path, compiled, {})
    assert load_file(tmp_path / "model.safetensors").keys() == tiny_model.state_dict().keys()


def test_export_requires_configs_in_meta(tmp_path):
    with pytest.raises(ValueError, match=r"meta\['core'\] must be the core config dict"):
        export_model(tmp_path, nn.Linear(2, 2), {})
    assert not any(tmp_path.iterdir())


def test_load_model_without_export_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors: train it first"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_load_model_refuses_tensors_that_do_not_fit_the_config(tmp_path, tiny_model):
    export_model(tmp_path, tiny_model, {})
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["core"]["width"] *= 2
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="shape-mismatched"):
        load_model(tmp_path)


def test_load_core_returns_core_tensors_relative_to_core(tmp_path, tiny_model):
    export_model(tmp_path, tiny_model, {})
    config, state = load_core(tmp_path)
    assert config == tiny_model.core_config
    expected = tiny_model.core.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v)


def test_a_state_or_export_holding_nan_or_inf_is_never_written(tmp_path):
    good = {"model": {"w": torch.ones(2)}, "step": 3}
    save_state(tmp_path, 3, good)
    bad = {"model": {"w": torch.ones(2), "b": torch.tensor([0.0, float("nan")])}, "step": 4}
    with pytest.raises(NonFiniteTensors, match=r"1 tensor\(s\) hold NaN or inf \(model/b\)"):
        save_state(tmp_path, 4, bad)
    assert [s for s, _ in list_states(tmp_path)] == [3]  # the earlier state is kept
    assert nonfinite_tensors({"a": [torch.tensor(float("inf")), torch.arange(3)]}) == ["a/0"]
    meta = {"core": {}, "shell": {}}
    with pytest.raises(NonFiniteTensors, match=r"model.safetensors not written.*\(w\)"):
        export_model(tmp_path, {"w": torch.tensor([float("-inf")])}, meta)
    assert not (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob(".tmp-*"))
