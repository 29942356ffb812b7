"""`greedygrow demo --quick` runs the whole method end to end and writes its grid."""

import json
import subprocess
import sys

import torch
from PIL import Image
from safetensors.torch import load_file

from greedygrow.data.scenes import HELD_OUT
from greedygrow.demo import PROMPTS


def test_demo_quick_runs_end_to_end_and_writes_its_grid(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "greedygrow", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grid = Image.open(out / "samples.png")
    assert grid.width >= 2 * 64 and grid.height >= 3 * 64  # 3 prompts × 2 images of 64 px
    assert str(out / "samples.png") in done.stdout and str(out / "grown") in done.stdout
    core_grid = Image.open(out / "core-samples.png")  # the same prompts from the 32 px core
    assert core_grid.height == grid.height and str(out / "core-samples.png") in done.stdout
    shipped = Image.open(out / "scenes-128-samples.png")  # what the full recipe reaches
    assert shipped.width >= 2 * 128 and str(out / "scenes-128-samples.png") in done.stdout
    core, grown = (
        json.loads((out / "core" / "model.json").read_text()),
        json.loads((out / "grown" / "model.json").read_text()),
    )
    assert core["shell"]["kind"] == "shallow" and core["resolution"] == 32
    assert grown["shell"]["kind"] == "grown" and grown["resolution"] == 64
    assert grown["mode"] == "greedy"
    a = load_file(out / "core" / "model.safetensors")
    b = load_file(out / "grown" / "model-raw.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("core."))  # frozen core


def test_demo_prompts_ask_for_held_out_colour_shape_pairs():
    asked = {(c, s) for c, s in HELD_OUT if any(f"{c} {s}" in p for p in PROMPTS)}
    assert len(asked) >= 2  # pairs the training never drew: composition, not recall
