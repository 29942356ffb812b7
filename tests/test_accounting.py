"""Compute accounting: every metrics line and export carries images, training FLOPs counted by
the layers, and wall and processor seconds; a grown model's totals add up its phases."""

import json
from pathlib import Path

import pytest

from greedygrow.accounting import train_flops_per_image
from greedygrow.config import core_config, grow_config, shell_config, train_core_config
from greedygrow.model import count_flops
from greedygrow.train import train
from test_train import GROW, TINY


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"data.text_cache_dir={tmp_path_factory.mktemp('text-cache')}"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _compute(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())["compute"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> tuple[Path, Path, object, object]:
    core_cfg = train_core_config(None, [*TINY, "run.steps=4", cache])
    core = train(core_cfg, tmp_path_factory.mktemp("core") / "run")
    grown_cfg = grow_config(str(core), 16, "greedy", None, None, [*GROW, "run.steps=3", cache])
    grown = train(grown_cfg, tmp_path_factory.mktemp("grown") / "run")
    return core, grown, core_cfg, grown_cfg


def test_metrics_carry_images_flops_and_seconds_from_the_layers_counts(runs):
    core, _, cfg, _ = runs
    forward = count_flops(core_config(cfg), shell_config(cfg))["total"]
    logged = _metrics(core)
    for m in logged:
        assert m["images"] == m["step"] * cfg.run.batch_size
        assert m["train_flops"] == m["images"] * 3 * forward  # everything trained: 3 × forward
        assert m["cpu_s"] > 0
    walls = [m["wall_s"] for m in logged]
    assert walls == sorted(walls) and walls[0] > 0
    compute = _compute(core)
    assert compute["phase"] == compute["total"]  # phase 1: nothing before it
    assert compute["phase"]["train_flops"] == logged[-1]["train_flops"]


def test_a_frozen_core_costs_its_forward_and_the_backward_through_it(runs):
    _, _, _, cfg = runs
    flops = count_flops(core_config(cfg), shell_config(cfg))
    assert train_flops_per_image(cfg, core_frozen=True) == 3 * flops["shell"] + 2 * flops["core"]
    assert train_flops_per_image(cfg, core_frozen=False) == 3 * flops["total"]


def test_a_grown_models_totals_add_up_both_phases(runs):
    core, grown, _, cfg = runs
    before, compute = _compute(core)["total"], _compute(grown)
    phase = compute["phase"]
    assert phase["images"] == 3 * cfg.run.batch_size
    assert phase["train_flops"] == phase["images"] * train_flops_per_image(cfg, True)
    for key in ("images", "train_flops", "wall_s", "cpu_s"):
        assert compute["total"][key] == pytest.approx(before[key] + phase[key])
    last = _metrics(grown)[-1]
    assert last["total_train_flops"] == pytest.approx(compute["total"]["train_flops"])
