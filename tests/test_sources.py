"""Real-data readers: folder and WebDataset shards, transforms, skips, rank × worker splits."""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from greedygrow.data import (
    FolderDataset,
    SkipCounter,
    WebDatasetStream,
    make_dataset,
    skip_none_collate,
)
from greedygrow.data.shards import plan_shards
from greedygrow.data.transforms import crop_box, prepare_image, to_rgb

RED, BLUE = (255, 0, 0), (0, 0, 255)


# ------------------------------------------------------------------------------ test data


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    return img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif6_jpeg() -> bytes:
    """Stored 64×32 left-red/right-blue, EXIF orientation 6 (display: rotate 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_halves(64, 32), "JPEG", quality=95, exif=exif)


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), written chunk by chunk."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2: RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + (chunk(b"IEND", b""))
    )


def _good_images() -> dict[str, bytes]:
    """name → encoded bytes of every image mode the readers must load."""
    rgba = Image.new("RGBA", (24, 24), (255, 0, 0, 0))  # fully transparent → white
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 12, 24))  # left half green, right half index 0 = transparent
    gray16 = Image.fromarray(np.full((24, 24), 25700, dtype=np.uint16))  # 25700 / 257 = 100
    rgb16 = np.zeros((24, 24, 3), dtype=np.uint16)
    rgb16[..., 0], rgb16[..., 1] = 25700, 65535
    return {
        "rgb.jpg": _encode(_halves(48, 24), "JPEG", quality=95),
        "cmyk.jpg": _encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95),
        "gray16.png": _encode(gray16, "PNG"),
        "rgb16.png": _png16(rgb16),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(palette, "PNG", transparency=0),
        "la.png": _encode(Image.new("LA", (24, 24), (0, 255)), "PNG"),
        "exif6.jpg": _exif6_jpeg(),
        "pic.webp": _encode(_halves(24, 24), "WEBP", lossless=True),
    }


def _bad_images() -> dict[str, bytes]:
    """name → bytes of images that must be skipped although they have a caption."""
    return {"truncated.jpg": _truncated_jpeg(), "empty.jpg": b"", "text.png": b"not an image\n"}


def _write_folder(root: Path) -> set[str]:
    """A folder with every case; returns the keys that must load."""
    for name, data in {**_good_images(), **_bad_images()}.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    (root / "nocap.jpg").write_bytes(_encode(_halves(24, 24), "JPEG"))
    (root / "emptycap.jpg").write_bytes(_encode(_halves(24, 24), "JPEG"))
    (root / "emptycap.txt").write_text("  \n")
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    (sub / "nested.png").write_bytes(_encode(_halves(30, 20), "PNG"))
    rows = [
        {"file_name": "deeper/nested.png", "caption": "a nested image"},
        {"file_name": "deeper/gone.png", "caption": "listed, never written"},
    ]
    (root / "sub" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = {Path(n).stem for n in _good_images()} | {"truncated", "sub/deeper/nested"}
    return good - {"truncated"}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """img2dataset layout: members <key>.<ext>, grouped by key."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                _member(tar, f"{key}.{ext}", data)


def _tiny(i: int) -> bytes:
    return _encode(Image.new("RGB", (8, 8), (i % 256, 0, 0)), "PNG")


def _write_plain_shards(root: Path, sizes: list[int]) -> tuple[str, set[str]]:
    """Shards of tiny PNG + txt samples; returns a brace pattern and every key."""
    keys = set()
    for s, n in enumerate(sizes):
        samples = {
            f"{s:03d}{i:04d}": {"png": _tiny(i), "txt": f"shard {s} item {i}".encode()}
            for i in range(n)
        }
        keys |= set(samples)
        _write_shard(root / f"shard-{s:05d}.tar", samples)
    return str(root / f"shard-{{00000..{len(sizes) - 1:05d}}}.tar"), keys


def _keys(dataset, workers: int, batch_size: int = 4) -> list[str]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return [k for batch in loader for k in batch["key"]]


# ------------------------------------------------------------------------------ transforms


def test_to_rgb_composites_alpha_on_white_and_scales_16_bit():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))  # 50% black over white ≈ 127
    assert abs(to_rgb(half).getpixel((0, 0))[0] - 127) <= 1
    levels = np.array([[0, 25700, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(levels))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 100, 255]  # clipping would give 255, 255
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == RED


def test_crop_box_centre_and_random_stay_inside_the_image():
    assert crop_box((64, 32), 16, train=False) == (16.0, 0.0, 48.0, 32.0)
    import random

    rng = random.Random(0)
    boxes = {crop_box((64, 32), 16, train=True, rng=rng) for _ in range(200)}
    assert len(boxes) > 5  # training crops move
    for x0, y0, x1, y1 in boxes:
        assert x0 >= 0 and x1 <= 64 and y0 == 0 and y1 == 32 and x1 - x0 == 32


def test_prepare_image_antialiases_and_scales_to_unit_range():
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    x = prepare_image(Image.fromarray(checker).convert("RGB"), 32, train=False)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.abs().max() < 0.1  # 1-px checkerboard averages to grey; point sampling gives ±1
    white = prepare_image(Image.new("RGB", (10, 10), (255, 255, 255)), 40, train=True)
    assert white.shape == (3, 40, 40) and torch.allclose(white, torch.ones_like(white))


def test_jpeg_draft_decoding_matches_full_decoding():
    yy, xx = np.mgrid[0:512, 0:1024]
    smooth = np.stack([xx / 4, yy / 2, (xx + yy) / 6], -1).astype(np.uint8)
    data = _encode(Image.fromarray(smooth), "JPEG", quality=95)
    fast = prepare_image(Image.open(io.BytesIO(data)), 64, train=False)  # decoded at 1/8 scale
    full = prepare_image(Image.open(io.BytesIO(data)).convert("RGB"), 64, train=False)
    assert (fast - full).abs().mean() < 0.02 and (fast - full).abs().max() < 0.15


# ------------------------------------------------------------------------------ folder


def test_folder_loads_every_mode_and_skips_bad_files_by_reason(tmp_path):
    good = _write_folder(tmp_path)
    ds = FolderDataset(tmp_path, 16, train=False)
    assert {it.key for it in ds.items} == good | {"truncated"}  # header check cannot see it
    assert ds.skips.counts == {
        "empty_file": 1,
        "not_an_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }
    loaded = {}
    for i in range(len(ds)):
        item = ds[i]
        if item is not None:
            loaded[item["key"]] = item
    assert set(loaded) == good
    assert ds.skips.counts["corrupt_image"] == 1
    for item in loaded.values():
        assert item["image"].shape == (3, 16, 16) and item["image"].abs().max() <= 1.0
        assert item["caption"] and json.loads(item["meta"])["source"] == "folder"
    assert loaded["sub/deeper/nested"]["caption"] == "a nested image"
    px = {k: v["image"][:, 8, 8] for k, v in loaded.items()}
    assert torch.allclose(px["rgba"], torch.ones(3))  # transparent composited on white
    assert torch.allclose(px["gray16"], torch.full((3,), 100 / 127.5 - 1), atol=1e-6)
    rgb16 = torch.tensor([100 / 127.5 - 1, 1.0, -1.0])
    assert torch.allclose(px["rgb16"], rgb16, atol=1e-6)
    assert px["cmyk"][0] > 0.9 and px["cmyk"][1:].max() < -0.8  # red
    assert px["la"].max() < -0.99  # opaque black
    pal = loaded["palette"]["image"]
    assert pal[1, 8, 2] > 0.99 and pal[0, 8, 2] < -0.99 and pal[:, 8, 13].min() > 0.99


def test_folder_applies_exif_orientation(tmp_path):
    (tmp_path / "r.jpg").write_bytes(_exif6_jpeg())
    (tmp_path / "r.txt").write_text("rotated")
    item = FolderDataset(tmp_path, 16, train=False)[0]
    assert json.loads(item["meta"])["native_size"] == [32, 64]  # displayed portrait
    img = item["image"]
    # displayed: top half red, bottom half blue (stored left column becomes the top row)
    assert img[0, :6].mean() > 0.9 and img[2, :6].mean() < -0.9
    assert img[2, -6:].mean() > 0.9 and img[0, -6:].mean() < -0.9


def test_folder_truncated_image_is_warned_once_and_dropped_by_collate(tmp_path, caplog):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(_tiny(1))
        (tmp_path / f"{name}.txt").write_text(name)
    (tmp_path / "t.jpg").write_bytes(_truncated_jpeg())
    (tmp_path / "t.txt").write_text("truncated")
    ds = FolderDataset(tmp_path, 8)
    with caplog.at_level(logging.WARNING, logger="greedygrow.data"):
        for _ in range(2):
            keys = [
                k for b in DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn) for k in b["key"]
            ]
            assert sorted(keys) == ["a", "b", "c"]
    assert ds.skips.counts == {"corrupt_image": 2}  # counted every epoch
    assert sum("t.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert skip_none_collate([None, None]) is None


def test_folder_skip_counts_from_dataloader_workers_reach_the_main_process(tmp_path):
    good = _write_folder(tmp_path)
    ds = FolderDataset(tmp_path, 8, train=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=skip_none_collate)
    keys = [k for b in loader if b is not None for k in b["key"]]
    assert sorted(keys) == sorted(good)
    assert ds.skips.counts["corrupt_image"] == 1
    assert "corrupt_image 1" in ds.skips.summary()


def test_folder_min_native_keeps_exactly_the_large_enough_images(tmp_path):
    sizes = {"a": (20, 90), "b": (63, 200), "c": (64, 64), "d": (300, 100), "e": (64, 65)}
    for name, (w, h) in sizes.items():
        (tmp_path / f"{name}.png").write_bytes(_encode(_halves(w, h), "PNG"))
        (tmp_path / f"{name}.txt").write_text(name)
    ds = FolderDataset(tmp_path, 32, min_native=64)
    assert [it.key for it in ds.items] == ["c", "d", "e"]
    assert (ds.skips.kept, ds.skips.below_min_native, ds.skips.skipped) == (3, 2, 0)
    with pytest.raises(ValueError, match="no usable image"):
        FolderDataset(tmp_path, 32, min_native=301)


def test_folder_min_native_reads_the_original_size_of_upscaled_images(tmp_path):
    # img2dataset-style sidecars: f was upscaled from 40 px, g stored smaller than its original
    for name, original in {"f": (40, 30), "g": (900, 700), "h": None}.items():
        (tmp_path / f"{name}.png").write_bytes(_encode(_halves(96, 80), "PNG"))
        meta = {"caption": name}
        if original:
            meta.update(original_width=original[0], original_height=original[1])
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    ds = FolderDataset(tmp_path, 32, min_native=64)
    assert [it.key for it in ds.items] == ["g", "h"]
    assert ds.skips.below_min_native == 1
    assert json.loads(FolderDataset(tmp_path, 32)[0]["meta"])["native_size"] == [40, 30]


def test_folder_metadata_with_a_byte_order_mark_or_not_utf8_is_read_or_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(_tiny(3))
    (tmp_path / "metadata.csv").write_bytes("\ufefffile_name,caption\na.png,hello\n".encode())
    assert [it.caption for it in FolderDataset(tmp_path, 8).items] == ["hello"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(_tiny(4))
    (tmp_path / "sub" / "b.txt").write_text("from a sidecar")
    (tmp_path / "sub" / "metadata.jsonl").write_bytes(b'{"file_name": "c.png", "text": "\xff"}\n')
    ds = FolderDataset(tmp_path, 8)
    assert sorted(it.caption for it in ds.items) == ["from a sidecar", "hello"]
    assert ds.skips.counts == {"bad_caption": 1}


def test_folder_reads_metadata_jsonl_and_csv_with_common_column_names(tmp_path):
    for name in ("x.png", "y.png", "z.png"):
        (tmp_path / "imgs" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(_tiny(3))
    (tmp_path / "metadata.csv").write_text(
        'Image,Text\nimgs/x.png,"a caption, with a comma"\nimgs/y.png,\n'
    )
    (tmp_path / "imgs" / "metadata.jsonl").write_text(
        json.dumps({"path": "z.png", "prompt": "from jsonl"}) + "\n" + "{broken\n"
    )
    ds = FolderDataset(tmp_path, 8)
    caps = {it.key: it.caption for it in ds.items}
    assert caps == {"imgs/x": "a caption, with a comma", "imgs/z": "from jsonl"}
    assert ds.skips.counts == {"empty_caption": 1, "bad_caption": 1}
    (tmp_path / "metadata.csv").write_text("name,words\nimgs/x.png,hello\n")
    with pytest.raises(ValueError, match="no column named"):
        FolderDataset(tmp_path, 8)


# ------------------------------------------------------------------------------ webdataset


def _mixed_shard(path: Path) -> set[str]:
    """A shard with every good and bad case; returns the keys that must load."""
    samples: dict[str, dict[str, bytes]] = {}
    for i, (name, data) in enumerate(_good_images().items()):
        ext = name.rsplit(".", 1)[1]
        if i % 2:
            samples[f"g{i:03d}"] = {ext: data, "txt": f"good {name}".encode()}
        else:  # caption only in img2dataset's json
            samples[f"g{i:03d}"] = {ext: data, "json": json.dumps({"caption": name}).encode()}
    for i, (name, data) in enumerate(_bad_images().items()):
        samples[f"b{i:03d}"] = {name.rsplit(".", 1)[1]: data, "txt": b"a caption"}
    samples["c000"] = {"jpg": _encode(_halves(8, 8), "JPEG")}  # no caption
    samples["c001"] = {
        "jpg": _encode(_halves(8, 8), "JPEG"),
        "txt": b" ",
        "json": json.dumps({"url": "http://x"}).encode(),
    }  # empty caption
    samples["c002"] = {"txt": b"caption without image"}
    _write_shard(path, samples)
    return {k for k in samples if k.startswith("g")}


def test_webdataset_loads_good_samples_and_counts_bad_ones(tmp_path):
    good = _mixed_shard(tmp_path / "mixed.tar")
    ds = WebDatasetStream(str(tmp_path / "mixed.tar"), 16, train=False)
    items = {it["key"]: it for it in ds}
    assert set(items) == good
    assert ds.skips.counts == {
        "corrupt_image": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }
    assert ds.skips.kept == len(good)
    exif = next(it for it in items.values() if "exif6" in it["caption"])
    assert json.loads(exif["meta"])["native_size"] == [32, 64]
    assert exif["image"][0, :6].mean() > 0.9 and exif["image"][2, -6:].mean() > 0.9
    gray = next(it for it in items.values() if "gray16" in it["caption"])
    assert torch.allclose(gray["image"], torch.full((3, 16, 16), 100 / 127.5 - 1), atol=1e-6)


def test_webdataset_survives_a_broken_shard(tmp_path):
    pattern, keys = _write_plain_shards(tmp_path, [3, 3, 3])
    broken = tmp_path / "shard-00001.tar"
    broken.write_bytes(broken.read_bytes()[:1100])  # cut inside the second member
    ds = WebDatasetStream(pattern, 8, train=False)
    got = [it["key"] for it in ds]
    assert {k for k in keys if not k.startswith("001")} <= set(got)
    assert len(got) == len(set(got)) and ds.skips.counts.get("broken_shard", 0) >= 1


def test_webdataset_min_native_uses_image_and_img2dataset_original_size(tmp_path):
    big, small = _encode(_halves(64, 80), "PNG"), _encode(_halves(40, 64), "PNG")
    upscaled = json.dumps({"caption": "up", "original_width": 30, "original_height": 90})
    _write_shard(
        tmp_path / "s.tar",
        {
            "big": {"png": big, "txt": b"big"},
            "small": {"png": small, "txt": b"small"},
            "upscaled": {"png": big, "json": upscaled.encode()},  # stored 64×80, original 30×90
        },
    )
    ds = WebDatasetStream(str(tmp_path / "s.tar"), 16, train=False, min_native=64)
    assert [it["key"] for it in ds] == ["big"]
    assert (ds.skips.kept, ds.skips.below_min_native) == (1, 2)
    every = {it["key"]: json.loads(it["meta"]) for it in WebDatasetStream(ds.urls, 16, False)}
    assert every["upscaled"]["native_size"] == [30, 90] and every["big"]["native_size"] == [64, 80]


@pytest.mark.parametrize("sizes", [[4, 3, 5, 2, 4], [6, 5, 7]])  # 5 and 3 shards, 4 consumers
@pytest.mark.parametrize("train", [True, False])
def test_two_workers_times_two_ranks_see_every_sample_once(tmp_path, sizes, train):
    pattern, keys = _write_plain_shards(tmp_path, sizes)
    seen: list[str] = []
    for rank in range(2):
        ds = WebDatasetStream(
            pattern, 8, train=train, resampled=False, rank=rank, world_size=2, shuffle_buffer=8
        )
        ds.set_epoch(3)
        seen += _keys(ds, workers=2)
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("shards", range(0, 10))
def test_plan_shards_assigns_every_sample_to_exactly_one_consumer(shards):
    sizes = [5 + (3 * s) % 7 for s in range(shards)]
    urls = [f"u{s}" for s in range(shards)]
    for n in range(1, 9):
        owners: Counter = Counter()
        load = []
        for c in range(n):
            plan = plan_shards(urls, c, n)
            mine = [(u, i) for u, k, o in plan for i in range(sizes[urls.index(u)]) if i % k == o]
            owners.update(mine)
            load.append(sum(1 / k for _, k, _ in plan))  # shards' worth of work
        assert set(owners) == {(u, i) for s, u in enumerate(urls) for i in range(sizes[s])}
        assert all(v == 1 for v in owners.values())
        if shards:
            assert max(load) - min(load) < 1  # balanced to within one shard


def test_resampled_stream_has_epoch_size_and_reshuffles_per_epoch(tmp_path):
    pattern, keys = _write_plain_shards(tmp_path, [5, 5, 5])
    ds = WebDatasetStream(pattern, 8, train=True, epoch_size=10, seed=1, shuffle_buffer=4)
    first = _keys(ds, workers=2)
    assert len(first) == 10 and set(first) <= keys
    assert _keys(ds, workers=2) == first  # same epoch, same seed: same samples
    ds.set_epoch(1)
    assert _keys(ds, workers=2) != first


def test_resampled_stream_over_unusable_shards_fails_instead_of_spinning(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    ds = WebDatasetStream(str(tmp_path / "junk.tar"), 8, train=True)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(ds))
    assert ds.skips.counts == {"broken_shard": 1}  # once per pass, however often it is drawn


def test_expand_shards_rejects_missing_shards(tmp_path):
    pattern, _ = _write_plain_shards(tmp_path, [1, 1])
    assert len(WebDatasetStream(str(tmp_path), 8).urls) == 2  # a directory of shards
    with pytest.raises(FileNotFoundError, match="not found"):
        WebDatasetStream(pattern.replace("00001", "00002"), 8)


# ------------------------------------------------------------------------------ API


def test_make_dataset_builds_each_source(tmp_path):
    (tmp_path / "shards").mkdir()
    pattern, _ = _write_plain_shards(tmp_path / "shards", [2])
    (tmp_path / "folder").mkdir()
    for i in range(5):
        (tmp_path / "folder" / f"{i}.png").write_bytes(_tiny(i))
        (tmp_path / "folder" / f"{i}.txt").write_text(str(i))
    folder = make_dataset("folder", tmp_path / "folder", 8, count=3, seed=1)
    assert isinstance(folder, FolderDataset) and len(folder) == 3
    wds_eval = make_dataset("webdataset", pattern, 8, train=False)
    assert isinstance(wds_eval, WebDatasetStream) and not wds_eval.resampled
    assert len(list(wds_eval)) == 2
    assert make_dataset("webdataset", pattern, 8, train=True).resampled
    scenes = make_dataset("scenes", None, 8, count=4)
    assert scenes[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="take no path"):
        make_dataset("scenes", tmp_path, 8)
    with pytest.raises(ValueError, match="unknown data source"):
        make_dataset("laion", tmp_path, 8)


def test_skip_counter_counts_by_reason_and_warns_once_per_path(caplog):
    c = SkipCounter("t")
    with caplog.at_level(logging.WARNING, logger="greedygrow.data"):
        for _ in range(3):
            c.skip("corrupt_image", "/a.jpg")
        c.skip("empty_file", "/b.jpg")
    c.keep(5)
    c.drop_small()
    assert c.counts == {"corrupt_image": 3, "empty_file": 1}
    assert (c.kept, c.below_min_native, c.skipped) == (5, 1, 4)
    assert len(caplog.records) == 2
    with pytest.raises(ValueError, match="unknown skip reason"):
        c.skip("bad_vibes", "/c.jpg")
    c.reset()
    assert c.as_dict()["kept"] == 0 and not c.counts
