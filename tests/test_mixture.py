"""data.mixture: sources drawn in proportion to their weights, a pure function of (seed, index),
refused with the entry named when it cannot be built, and trained on in both phases."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from greedygrow.config import ConfigError, grow_config, train_core_config
from greedygrow.data import Mixture, ScenesDataset, make_mixture
from greedygrow.train import train
from test_train import GROW, TINY

FOLDER_IMAGES = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder of FOLDER_IMAGES 24×24 images whose captions say where they come from."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(FOLDER_IMAGES):
        Image.new("RGB", (24, 24), (40 * i, 100, 200)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo from the folder, number {i}")
    return root


def _entries(folder: Path, scenes: int = 3000) -> list[dict]:
    return [
        {"source": "scenes", "count": scenes, "weight": 3},
        {"source": "folder", "path": str(folder), "weight": 1.0},
    ]


def test_mixture_draws_each_source_in_proportion_to_its_weight(folder):
    mixture = make_mixture(_entries(folder), resolution=8, seed=0)
    n = len(mixture)
    assert n == 3000 + FOLDER_IMAGES  # the sources' total
    captions = [mixture.caption(i) for i in range(n)]  # what the trainer's text table reads
    from_folder = np.array([c.startswith("a photo from the folder") for c in captions])
    drawn = [c for c, f in zip(captions, from_folder, strict=True) if f]
    share, se = len(drawn) / n, (0.25 * 0.75 / n) ** 0.5
    assert abs(share - 0.25) < 4 * se, (share, se)
    # the folder's items uniformly: each about n/4/6 ≈ 125 times
    counts = np.array(
        [drawn.count(f"a photo from the folder, number {i}") for i in range(FOLDER_IMAGES)]
    )
    expected = len(drawn) / FOLDER_IMAGES
    assert np.all(np.abs(counts - expected) < 5 * expected**0.5), counts
    for i in [*np.flatnonzero(from_folder)[:3], *np.flatnonzero(~from_folder)[:3]]:
        item = mixture[int(i)]  # its source's item, with the caption(i) the table holds
        assert item["caption"] == captions[i] and item["image"].shape == (3, 8, 8)
        assert item["key"].startswith("img" if from_folder[i] else "s0-")


def test_mixture_is_a_pure_function_of_seed_and_index():
    sources = [ScenesDataset(50, 8, seed=0), ScenesDataset(20, 8, seed=1)]
    a = Mixture(sources, [1, 2], seed=7, length=4000)
    b = Mixture(sources, [1, 2], seed=7, length=1000)  # shorter: the same first items
    assert np.array_equal(a.source[:1000], b.source) and np.array_equal(a.index[:1000], b.index)
    c = Mixture(sources, [1, 2], seed=8, length=4000)
    assert not np.array_equal(a.source, c.source)
    assert set(a.index[a.source == 1].tolist()) == set(range(20))  # every item, none beyond
    assert abs(np.mean(a.source == 1) - 2 / 3) < 4 * (2 / 9 / 4000) ** 0.5


def test_mixture_batches_drop_items_a_source_cannot_decode(folder):
    mixture = make_mixture(_entries(folder, scenes=10), resolution=8, seed=0)
    batch = mixture.collate_fn([mixture[0], None, mixture[1]])
    assert batch["image"].shape == (2, 3, 8, 8)
    assert mixture.collate_fn([None]) is None


def _mixture_override(entries: list[dict]) -> str:
    return "data.mixture=" + json.dumps(entries)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "folder", "weight": 1}, "data.mixture[1].path is required"),
        ({"source": "scenes", "count": 5, "colour": "red"}, "data.mixture[1]: unknown keys"),
        ({"source": "scenes", "count": 5, "weight": 0}, "data.mixture[1].weight must be"),
        ({"source": "scenes", "weight": 1}, "data.mixture[1].count is required for scenes"),
        ({"source": "webdataset", "path": "x.tar"}, "data.mixture[1]: webdataset shards cannot"),
        ({"source": "images", "path": "x"}, "data.mixture[1].source must be scenes or folder"),
    ],
)
def test_config_refuses_a_bad_mixture_entry_naming_it(entry, message):
    good = {"source": "scenes", "count": 10, "weight": 2.5}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        train_core_config(None, [_mixture_override([good, entry])])


def test_a_mixture_needs_no_data_path():
    cfg = train_core_config(
        None, ["data.source=folder", _mixture_override([{"source": "scenes", "count": 10}])]
    )
    assert cfg.data.mixture == [{"source": "scenes", "count": 10}]


def test_train_core_and_grow_train_on_a_mixture(folder, tmp_path):
    text_cache = f"data.text_cache_dir={tmp_path / 'text-cache'}"
    mixture = _mixture_override(_entries(folder, scenes=100))
    core = train(
        train_core_config(None, [*TINY, "run.steps=2", mixture, text_cache]), tmp_path / "core"
    )
    over = [*GROW, "run.steps=2", mixture, text_cache]
    run = train(grow_config(str(core), 16, "joint", None, None, over), tmp_path / "grow")
    for r in (core, run):
        losses = [json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(np.isfinite(losses))
    assert not (core / "scenes").exists()  # no scene cache for a mixture
