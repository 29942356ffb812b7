"""Training's data path: the uint8 scene cache (the data set's exact pixels, drawn once, shared
by processes and runs; a damaged or missing file or row drawn again, never returned), which
items a rank reads, and their rows in the text table."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from greedygrow.data import ScenesDataset
from greedygrow.data.order import StepSampler, TextRows
from greedygrow.data.scene_cache import FINGERPRINT_ITEMS, SceneCache
from greedygrow.data.transforms import to_float


class CountingScenes(ScenesDataset):
    """Scenes that count their drawings (in this process)."""

    drawn = 0

    def pixels(self, i: int) -> np.ndarray:
        CountingScenes.drawn += 1
        return super().pixels(i)


@pytest.fixture
def scenes():
    CountingScenes.drawn = 0
    return CountingScenes(12, 16, seed=3)


def test_cached_pixels_convert_to_the_data_sets_exact_images(scenes, tmp_path):
    cache = SceneCache(scenes, tmp_path)
    for i in range(len(scenes)):
        item, want = cache[i], scenes[i]
        assert item["image"].dtype == torch.uint8 and item["caption"] == want["caption"]
        assert torch.equal(
            to_float(item["image"]).view(torch.int32), want["image"].view(torch.int32)
        )


def test_rows_are_drawn_once_and_reused_by_a_later_run(scenes, tmp_path):
    cache = SceneCache(scenes, tmp_path)
    first = [cache[i]["image"] for i in range(len(scenes))]
    drawn = CountingScenes.drawn
    later = SceneCache(scenes, tmp_path, captions=False)  # e.g. the next run, or a resume
    again = [later[i] for i in range(len(scenes))]
    assert CountingScenes.drawn == drawn + FINGERPRINT_ITEMS  # no row drawn again
    assert all(torch.equal(a, b["image"]) for a, b in zip(first, again, strict=True))
    assert set(again[0]) == {"image"}


def test_rows_drawn_by_a_dataloader_worker_are_read_by_the_main_process(scenes, tmp_path):
    cache = SceneCache(scenes, tmp_path, captions=False)
    for _ in DataLoader(cache, batch_size=4, num_workers=1):
        pass
    drawn = CountingScenes.drawn
    cache[5], cache[11]
    assert CountingScenes.drawn == drawn


def test_the_cache_key_follows_the_data_sets_parameters(tmp_path):
    folders = {
        SceneCache(ScenesDataset(*args), tmp_path).folder
        for args in [(12, 16, 3), (12, 16, 4), (12, 32, 3), (13, 16, 3), (12, 16, 3, 64)]
    }
    assert len(folders) == 5


@pytest.mark.parametrize("damage", ["flip-pixel", "flip-digest", "truncate", "delete"])
def test_a_damaged_cache_is_drawn_again_never_returned(scenes, tmp_path, damage):
    cache = SceneCache(scenes, tmp_path)
    want = [cache[i]["image"].clone() for i in range(len(scenes))]
    images, digests = cache.folder / "images.u8", cache.folder / "digests.i64"
    data = bytearray(images.read_bytes())
    if damage == "flip-pixel":
        data[3 * 16 * 16 * 7 + 100] ^= 0x01  # row 7
        images.write_bytes(bytes(data))
    elif damage == "flip-digest":
        sums = bytearray(digests.read_bytes())
        sums[8 * 2] ^= 0x10  # row 2
        digests.write_bytes(bytes(sums))
    elif damage == "truncate":
        images.write_bytes(bytes(data[: len(data) // 2]))
    else:
        digests.unlink()
    CountingScenes.drawn = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reread = SceneCache(scenes, tmp_path)
        got = [reread[i]["image"] for i in range(len(scenes))]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    redrawn = CountingScenes.drawn - FINGERPRINT_ITEMS
    assert redrawn == {"flip-pixel": 1, "flip-digest": 1, "truncate": 12, "delete": 12}[damage]
    assert any("wrong size" in str(w.message) for w in caught) == (damage == "truncate")
    assert images.stat().st_size == 12 * 3 * 16 * 16 and not list(cache.folder.glob(".tmp-*"))


@pytest.mark.parametrize("n, batch, world, start, stop", [(50, 8, 1, 0, 3), (37, 6, 3, 2, 9)])
def test_indices_read_are_exactly_those_the_step_sampler_yields(n, batch, world, start, stop):
    for rank in range(world):
        sampler = StepSampler(n, batch, rank, world, 7, start)
        yielded = itertools.islice(iter(sampler), stop - start)
        assert sampler.indices_read(stop).tolist() == sorted({i for b in yielded for i in b})


def test_an_item_outside_the_text_table_is_an_error(scenes):
    rows = np.full(len(scenes), -1)
    rows[[1, 4]] = [0, 1]
    numbered = TextRows(scenes, rows)
    assert numbered[4]["text_row"] == 1
    with pytest.raises(IndexError, match="no row in the text table"):
        numbered[2]
