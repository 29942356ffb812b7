"""Training states: folders of safetensors shards + a JSON index, atomic, resumable on any
number of processes (the multi-process cases are in test_distributed.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open

from greedygrow.checkpoint import CheckpointMismatch, NonFiniteTensors
from greedygrow.state import (
    INDEX,
    latest_state,
    list_states,
    load_state,
    save_state,
    state_path,
)


def _state(step: int) -> dict:
    """A trainer-like state: model, AdamW (its state keyed by name), EMA, JSON values."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = dict(enumerate(n for n, _ in model.named_parameters()))
    optim = opt.state_dict()
    optim["state"] = {names[i]: v for i, v in optim["state"].items()}
    optim["param_groups"][0]["params"] = list(names.values())
    return {
        "model": model.state_dict(),
        "optimizer": optim,
        "ema": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
        "posthoc_ema": {},
        "step": step,
        "compute": {"images": 12.0 * step, "wall_s": 3.5},
        "config": {"lr": 1e-3, "name": "x", "betas": [0.9, 0.99], "none": None},
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


def test_a_state_round_trips_as_safetensors_shards_and_a_json_index(tmp_path):
    state = _state(5)
    path = save_state(tmp_path, 5, state)
    assert path == state_path(tmp_path, 5) == tmp_path / "state" / "step-00000005"
    files = sorted(p.name for p in path.iterdir())
    assert files[-1] == INDEX and all(f.endswith(".safetensors") for f in files[:-1])
    index = json.loads((path / INDEX).read_text())
    assert index["step"] == 5 and index["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert sorted(index["files"]) == files[:-1]  # with their sizes, checked on load
    with safe_open(path / files[0], framework="pt") as f:
        assert "model/weight" in f.keys()  # noqa: SIM118 (safe_open)
    _assert_same(load_state(path), state)


def test_loading_into_a_state_fills_its_tensors_in_place(tmp_path):
    saved = _state(3)
    path = save_state(tmp_path, 3, saved)
    like = _state(0)
    weight = like["model"]["weight"]
    loaded = load_state(path, like=like)
    assert loaded["model"]["weight"] is weight and torch.equal(weight, saved["model"]["weight"])
    assert loaded["step"] == 3 and loaded["compute"] == saved["compute"]


def test_a_state_that_does_not_fit_is_refused_naming_the_tensors(tmp_path):
    path = save_state(tmp_path, 1, _state(1))
    like = _state(0)
    like["model"]["weight"] = torch.zeros(5, 4)
    like["model"]["extra"] = torch.zeros(2)
    del like["ema"]["bias"]
    with pytest.raises(CheckpointMismatch) as e:
        load_state(path, like=like)
    message = str(e.value)
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in message
    assert "missing:    model/extra" in message and "unexpected: ema/bias" in message
    assert "shape:      model/weight state [3, 4] vs run [5, 4]" in message


def test_latest_state_is_none_without_states(tmp_path):
    assert latest_state(tmp_path) is None
    assert latest_state(tmp_path / "missing") is None


def test_save_state_keeps_the_last_k(tmp_path):
    for step in (0, 100, 200, 300, 400):
        save_state(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    assert [s for s, _ in list_states(tmp_path)] == [300, 400]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "step-00000300",
        "step-00000400",
    ]
    assert load_state(latest_state(tmp_path)[1])["step"] == 400


def test_states_order_by_step_not_name(tmp_path):
    save_state(tmp_path, 99_999_999, {"step": 99_999_999})
    save_state(tmp_path, 100_000_000, {"step": 100_000_000})  # one more digit than the pad
    assert latest_state(tmp_path)[0] == 100_000_000


def test_a_save_killed_midway_leaves_no_state_and_its_folder_is_removed(tmp_path):
    save_state(tmp_path, 1, _state(1))
    killed = tmp_path / "state" / ".tmp-step-00000002"  # as a save killed before its rename
    killed.mkdir()
    (killed / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"half")
    assert [s for s, _ in list_states(tmp_path)] == [1]
    save_state(tmp_path, 3, _state(3))
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "step-00000001",
        "step-00000003",
    ]


def test_saving_a_step_again_replaces_its_state(tmp_path):
    save_state(tmp_path, 2, {"step": 2, "w": torch.zeros(3)})
    save_state(tmp_path, 2, {"step": 2, "w": torch.ones(3)})
    assert torch.equal(load_state(state_path(tmp_path, 2))["w"], torch.ones(3))


def test_a_truncated_shard_makes_resume_fall_back_with_a_warning(tmp_path, caplog):
    save_state(tmp_path, 10, _state(10))
    latest = save_state(tmp_path, 20, _state(20))
    shard = next(latest.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="greedygrow.state"):
        step, path = latest_state(tmp_path)
    assert step == 10 and load_state(path)["step"] == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert shard.name in warnings[0] and "falling back" in warnings[0]


def test_all_states_damaged_gives_none(tmp_path, caplog):
    path = save_state(tmp_path, 1, _state(1))
    next(path.glob("*.safetensors")).unlink()
    with caplog.at_level(logging.WARNING, logger="greedygrow.state"):
        assert latest_state(tmp_path) is None
    assert "step-00000001" in caplog.text and "missing" in caplog.text


def test_values_that_are_not_json_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="ndarray"):
        save_state(tmp_path, 1, {"rng": {"numpy": np.zeros(3)}})
    with pytest.raises(TypeError, match="use str keys"):
        save_state(tmp_path, 1, {"optimizer": {"state": {0: {"step": torch.ones(())}}}})
    assert list_states(tmp_path) == [] and not list((tmp_path / "state").glob("*"))


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_save_state_rejects_a_bad_step(tmp_path, step):
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_state(tmp_path, step, {})


def test_a_state_holding_nan_or_inf_is_never_written(tmp_path):
    save_state(tmp_path, 3, {"model": {"w": torch.ones(2)}, "step": 3})
    bad = {"model": {"w": torch.ones(2), "b": torch.tensor([0.0, float("nan")])}, "step": 4}
    with pytest.raises(NonFiniteTensors, match=r"1 tensor\(s\) hold NaN or inf \(model/b\)"):
        save_state(tmp_path, 4, bad)
    assert [s for s, _ in list_states(tmp_path)] == [3]  # the earlier state is kept


def test_a_single_file_state_of_format_1_still_resumes(tmp_path):
    state = _state(7)
    old = tmp_path / "state" / "step-00000007.pt"
    old.parent.mkdir()
    torch.save(state, old)
    assert latest_state(tmp_path) == (7, old)
    _assert_same(load_state(old), state)
    like = _state(0)
    load_state(old, like=like)
    assert torch.equal(
        like["optimizer"]["state"]["weight"]["exp_avg"],
        state["optimizer"]["state"]["weight"]["exp_avg"],
    )
    save_state(tmp_path, 8, _state(8), keep=1)  # the new format replaces it in turn
    assert [p.name for _, p in list_states(tmp_path)] == ["step-00000008"]
