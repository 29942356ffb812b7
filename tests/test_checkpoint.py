"""Atomic writes, safetensors exports and strict loading (training states: test_state.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from greedygrow.atomic import atomic_write, atomic_write_json
from greedygrow.checkpoint import (
    CheckpointMismatch,
    NonFiniteTensors,
    export_model,
    load_core,
    load_model,
    load_strict,
    nonfinite_tensors,
    read_meta,
    unwrap_model,
    write_safetensors,
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


def test_an_export_holding_nan_or_inf_is_never_written(tmp_path):
    assert nonfinite_tensors({"a": [torch.tensor(float("inf")), torch.arange(3)]}) == ["a/0"]
    meta = {"core": {}, "shell": {}}
    with pytest.raises(NonFiniteTensors, match=r"model.safetensors not written.*\(w\)"):
        export_model(tmp_path, {"w": torch.tensor([float("-inf")])}, meta)
    assert not (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob(".tmp-*"))


def test_streamed_safetensors_read_back_with_the_safetensors_library(tmp_path):
    weight = torch.randn(3, 5)
    state = {
        "w": weight,
        "tied": weight,  # the same storage under two names
        "view": weight[:, 1],  # not contiguous
        "half": torch.randn(4).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "count": torch.tensor(7),  # 0-dim
        "empty": torch.zeros(0, 2),
    }
    path = write_safetensors(tmp_path / "x.safetensors", state, {"note": "kept"})
    loaded = load_file(path)
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"note": "kept"}
