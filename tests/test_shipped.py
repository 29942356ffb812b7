"""Shipped models (greedygrow/shipped.py, docs/models.md): addressable by name from any
directory, bf16 and small, and a copy of a grown run that samples and grows like the run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from greedygrow.checkpoint import load_model, read_meta
from greedygrow.cli import main
from greedygrow.config import grow_config, load_config, run_config, train_core_config
from greedygrow.shipped import PHASE1_FOLDER, resolve_model, shipped_models
from greedygrow.train import train

TINY = [
    "model.core=cpu-tiny",
    "model.core_overrides.depth=1",
    "model.core_overrides.grid=4",
    "model.resolution=8",
    "data.count=200",
    "run.batch_size=4",
    "run.steps=2",
    "run.log_every=1",
    "run.sample_every=0",
    "run.progress=false",
]
GROW = [x for x in TINY if not x.startswith(("model.core", "model.resolution"))]


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    return done.value.code


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict[str, Path]:
    """A tiny core grown to 16 px with the phase-1 shell kept inside, shipped to a folder."""
    root = tmp_path_factory.mktemp("ship")
    cache = f"data.text_cache_dir={root / 'text-cache'}"
    core = train(train_core_config(None, [*TINY, cache]), root / "core")
    grown_cfg = grow_config(
        str(core), 16, "greedy", None, None, [*GROW, cache, "grow.init=preserve"]
    )
    grown = train(grown_cfg, root / "grown")
    (root / "card.json").write_text(json.dumps({"recipe": "test"}))
    out = root / "weights" / "tiny-16"
    assert (
        _cli("export", "--run", str(grown), "--out", str(out), "--card", str(root / "card.json"))
        == 0
    )
    return {"root": root, "core": core, "grown": grown, "shipped": out}


def test_shipped_model_is_bf16_and_samples_like_its_run(shipped):
    tensors = load_file(shipped["shipped"] / "model.safetensors")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    meta = read_meta(shipped["shipped"])
    assert (
        meta["card"] == {"recipe": "test"} and meta["shell"] == read_meta(shipped["grown"])["shell"]
    )
    a, _ = load_model(shipped["grown"])
    b, _ = load_model(shipped["shipped"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert q.dtype == torch.float32, name  # loaded into the fp32 model
        assert torch.equal(q, p.to(torch.bfloat16).float()), name


def test_shipped_config_points_at_its_own_phase1_copy_without_run_paths(shipped):
    text = (shipped["shipped"] / "config.yaml").read_text()
    assert str(shipped["root"]) not in text  # no path of the machine it was trained on
    cfg = run_config(shipped["shipped"])
    assert Path(cfg.grow.core) == shipped["shipped"] / PHASE1_FOLDER
    assert run_config(cfg.grow.core).phase == "core"
    assert load_config(shipped["shipped"] / PHASE1_FOLDER / "config.yaml").model.resolution == 8


def test_a_shipped_copy_samples_and_grows_from_another_directory(shipped, tmp_path, monkeypatch):
    moved = shutil.copytree(shipped["shipped"], tmp_path / "site-packages" / "tiny-16")
    monkeypatch.chdir(tmp_path)  # wherever the package lands, whatever the working directory
    cache = f"data.text_cache_dir={shipped['root'] / 'text-cache'}"
    assert _cli("sample", "--model", str(moved), "--out", "g.png", "--steps", "2", "a cat") == 0
    assert Image.open(tmp_path / "g.png").width >= 16
    args = ["--resolution", "32", "--out", "g32", *GROW, cache, "run.steps=1"]
    assert _cli("grow", "--core", str(moved), *args) == 0
    grown = load_file(tmp_path / "g32" / "model-raw.safetensors")
    source = load_file(moved / "model.safetensors")
    core = [k for k in source if k.startswith("core.")]
    assert all(torch.equal(grown[k], source[k].float()) for k in core)  # greedy: kept


def test_a_scratch_run_ships_without_its_phase1_path(shipped):
    root, cache = shipped["root"], f"data.text_cache_dir={shipped['root'] / 'text-cache'}"
    cfg = grow_config(str(shipped["core"]), 16, "scratch", None, None, [*GROW, cache])
    run = train(cfg, root / "scratch")
    out = root / "weights" / "scratch-16"
    assert _cli("export", "--run", str(run), "--out", str(out)) == 0
    assert str(root) not in (out / "config.yaml").read_text()
    assert run_config(out).grow.core is None and not (out / PHASE1_FOLDER).exists()
    assert load_model(out)[0] is not None


def test_names_resolve_to_the_shipped_models_from_any_directory(tmp_path, monkeypatch):
    models = shipped_models()
    assert "scenes-128" in models
    monkeypatch.chdir(tmp_path)
    assert resolve_model("scenes-128") == models["scenes-128"]
    os.mkdir(tmp_path / "scenes-128")  # a folder of that name here wins: paths come first
    assert resolve_model("scenes-128") == Path("scenes-128")
    with pytest.raises(FileNotFoundError, match=r"shipped: .*scenes-128.*greedygrow models"):
        resolve_model("no-such-model")


def test_the_shipped_scenes_model_is_small_bf16_and_carries_its_card():
    folder = shipped_models()["scenes-128"]
    assert (folder / "model.safetensors").stat().st_size < 40 * 2**20
    meta = read_meta(folder)
    assert meta["resolution"] == 128 and meta["shell"]["kind"] == "grown"
    assert {"recipe", "trained", "scores"} <= set(meta["card"])
    model, _ = load_model(folder)  # strict: every tensor present, with its shape
    assert sum(p.numel() for p in model.parameters()) > 1e6
    assert run_config(folder).phase == "grow"


def test_models_command_lists_the_shipped_model(capsys):
    assert _cli("models") == 0
    assert "scenes-128" in capsys.readouterr().out
    assert _cli("models", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["scenes-128"]["resolution"] == 128


def test_sample_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli("sample", "--model", "scenes-128", "--out", "g.png", "--steps", "2",
                "--per-prompt", "1", "three striped red circles") == 0  # fmt: skip
    assert Image.open(tmp_path / "g.png").height >= 128
