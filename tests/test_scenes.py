"""Scenes: determinism, captions vs ground truth, native-resolution filter, rendering, CLI."""

import io
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from greedygrow.cli import main as cli_main
from greedygrow.data.scenes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    GAP,
    HELD_OUT,
    NATIVE_MAX,
    NATIVE_MIN,
    SHAPES,
    Group,
    Scene,
    ScenesDataset,
    ScenesStream,
    make_scene,
    native_resolution,
    native_resolutions,
    parse_caption,
    render,
    render_native,
    sample_scene,
    shard_indices,
    write_dataset,
)

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes():
    return [sample_scene(0, i) for i in range(N_SCENES)]


def test_same_seed_and_index_give_identical_pixels_and_caption():
    for index in (0, 7, 123):
        a, b = sample_scene(3, index), sample_scene(3, index)
        assert a == b
        assert np.array_equal(np.asarray(render(a, 96)), np.asarray(render(b, 96)))
        ds = ScenesDataset(200, 48, seed=3)
        x, y = ds[index], ds[index]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert sample_scene(3, 0).to_json() != sample_scene(4, 0).to_json()
    assert sample_scene(3, 0).to_json() != sample_scene(3, 1).to_json()


def test_sampling_ignores_global_random_state():
    np.random.seed(1)
    torch.manual_seed(1)
    a = sample_scene(0, 5)
    np.random.seed(2)
    torch.manual_seed(2)
    assert sample_scene(0, 5) == a


def test_captions_agree_with_ground_truth(scenes):
    for s in scenes:
        parsed = parse_caption(s.caption)
        assert parsed == list(s.groups), s.caption
        per_group = Counter(o.group for o in s.objects)
        for k, g in enumerate(s.groups):
            assert per_group[k] == g.count
            members = [o for o in s.objects if o.group == k]
            assert all(
                (o.color, o.shape, o.attribute) == (g.color, g.shape, g.attribute) for o in members
            )
        assert len({(g.color, g.shape, g.attribute) for g in s.groups}) == len(s.groups)
        assert 1 <= s.count <= 5


def test_counts_one_to_five_all_occur_with_every_colour_shape_and_attribute(scenes):
    assert {s.count for s in scenes} == {1, 2, 3, 4, 5}
    assert {g.count for s in scenes for g in s.groups} == {1, 2, 3, 4, 5}
    groups = [g for s in scenes for g in s.groups]
    assert {g.color for g in groups} == set(COLORS)
    assert {g.shape for g in groups} == set(SHAPES)
    assert {g.attribute for g in groups} == set(ATTRIBUTES)
    assert len({s.caption.split(" ")[0] for s in scenes}) >= 6  # several templates in use
    assert any(" one " in f" {s.caption} " for s in scenes)  # "one" paraphrases "a"


def test_training_scenes_never_show_a_held_out_pair(scenes):
    pairs = {(g.color, g.shape) for s in scenes for g in s.groups}
    assert pairs.isdisjoint(HELD_OUT)
    assert len(pairs) == len(COLORS) * len(SHAPES) - len(HELD_OUT)


def test_parse_caption_reads_counts_words_and_articles():
    groups = parse_caption(
        "a picture with three red circles, an outlined orange star and one blue square"
    )
    assert groups == [
        Group("red", "circle", "plain", 3),
        Group("orange", "star", "outlined", 1),
        Group("blue", "square", "plain", 1),
    ]
    assert parse_caption("two yellow triangles on a pale blue background") == [
        Group("yellow", "triangle", "plain", 2)
    ]


def test_colours_are_well_separated_from_each_other_and_from_backgrounds():
    cols = np.array(list(COLORS.values()), dtype=float)
    bgs = np.array(list(BACKGROUNDS.values()), dtype=float)
    dist = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert dist[~np.eye(len(cols), dtype=bool)].min() > 60
    assert np.linalg.norm(cols[:, None] - bgs[None], axis=-1).min() > 100
    assert len(COLORS) >= 6 and len(SHAPES) >= 4


def test_boxes_stay_inside_the_image_and_apart(scenes):
    for s in scenes:
        boxes = [o.box for o in s.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0.0 < x0 < x1 < 1.0 and 0.0 < y0 < y1 < 1.0
        for a, b in itertools.combinations(boxes, 2):
            apart_x = a[2] + GAP <= b[0] + 1e-9 or b[2] + GAP <= a[0] + 1e-9
            apart_y = a[3] + GAP <= b[1] + 1e-9 or b[3] + GAP <= a[1] + 1e-9
            assert apart_x or apart_y, (s.caption, a, b)


def test_objects_are_drawn_inside_their_boxes_and_fill_them(scenes):
    n = 128
    for s in scenes[:60]:
        if s.background.kind != "plain":
            continue
        img = np.asarray(render(s, n)).astype(int)
        inside = np.zeros((n, n), dtype=bool)
        for o in s.objects:
            x0, y0, x1, y1 = (np.array(o.box) * n).tolist()
            inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            # the shape reaches all four sides of its tight box (within 1.5 px); other objects
            # are ≥ GAP·n = 5 px away, so a 2 px margin around the box sees only this one
            r0, c0 = int(y0) - 2, int(x0) - 2
            crop = img[r0 : int(np.ceil(y1)) + 2, c0 : int(np.ceil(x1)) + 2]
            ink = np.abs(crop - s.background.color).sum(-1) > 30
            rows, cols = np.flatnonzero(ink.any(1)) + r0, np.flatnonzero(ink.any(0)) + c0
            assert abs(cols.min() - x0) <= 1.5 and abs(cols.max() + 1 - x1) <= 1.5, o
            assert abs(rows.min() - y0) <= 1.5 and abs(rows.max() + 1 - y1) <= 1.5, o
        outside = np.abs(img - np.array(s.background.color)).sum(-1)[~inside]
        assert outside.max() <= 2, s.caption


def test_render_at_32_and_512_is_rgb_of_that_size_with_correct_colours():
    s = make_scene(
        [Group("red", "circle", "plain", 1), Group("blue", "square", "plain", 2)], seed=1
    )
    for n in (32, 512):
        img = render(s, n)
        assert img.mode == "RGB" and img.size == (n, n)
        px = np.asarray(img).astype(int)
        assert np.abs(px[0, 0] - BACKGROUNDS["white"]).max() <= 1
        for o in s.objects:
            cx, cy = int((o.box[0] + o.box[2]) / 2 * n), int((o.box[1] + o.box[3]) / 2 * n)
            assert np.abs(px[cy, cx] - COLORS[o.color]).max() <= 1
    edge = np.asarray(render(s, 64)).reshape(-1, 3).astype(int)
    bg, red = np.array(BACKGROUNDS["white"]), np.array(COLORS["red"])
    partial = (np.abs(edge - bg).max(1) > 8) & (np.abs(edge - red).max(1) > 8)
    partial &= np.abs(edge - COLORS["blue"]).max(1) > 8
    assert partial.sum() > 10  # anti-aliased: edge pixels blend object and background


def test_fine_detail_shows_at_high_resolution_only():
    s = make_scene([Group("green", "square", "striped", 1)], seed=2)
    box = s.objects[0].box

    def inner_std(n):
        px = np.asarray(render(s, n)).astype(float)
        x0, y0, x1, y1 = (int(v * n) for v in box)
        m = (x1 - x0) // 4
        return px[y0 + m : y1 - m, x0 + m : x1 - m].std(axis=(0, 1)).max()

    assert inner_std(512) > 20
    assert inner_std(32) < 3


def test_json_round_trip_renders_identically(scenes):
    for s in scenes[:20]:
        t = Scene.from_json(s.to_json())
        assert t == s
        assert np.array_equal(np.asarray(render(t, 64)), np.asarray(render(s, 64)))
    d = json.loads(scenes[0].to_json())
    assert set(d) >= {"caption", "native_resolution", "background", "objects", "groups"}
    assert set(d["objects"][0]) >= {"color", "shape", "attribute", "box"}
    minimal = {k: d[k] for k in ("caption", "native_resolution", "objects")}
    minimal["objects"] = [
        {k: o[k] for k in ("color", "shape", "attribute", "box")} for o in d["objects"]
    ]
    rebuilt = Scene.from_dict(minimal)
    strip = lambda objs: [(o.color, o.shape, o.attribute, o.box) for o in objs]
    assert strip(rebuilt.objects) == strip(scenes[0].objects)
    assert sorted(map(repr, rebuilt.groups)) == sorted(map(repr, scenes[0].groups))
    with pytest.raises(ValueError, match=r"colou?r"):
        Scene.from_dict({**minimal, "objects": [{**minimal["objects"][0], "color": "teal"}]})


def test_native_resolution_distribution_is_web_like():
    n = native_resolutions(0, np.arange(50_000))
    assert n.min() >= NATIVE_MIN and n.max() <= NATIVE_MAX
    assert 0.6 < (n < 128).mean() < 0.8  # most images are small
    assert 0.02 < (n >= 512).mean() < 0.06  # a few percent are 512 px or more
    assert [native_resolution(0, i) for i in range(50)] == n[:50].tolist()
    assert [sample_scene(0, i).native_resolution for i in range(50)] == n[:50].tolist()
    assert not np.array_equal(n[:1000], native_resolutions(1, np.arange(1000)))


def test_resolution_filter_keeps_exactly_the_samples_whose_native_size_passes():
    ds = ScenesDataset(2000, 32, seed=5, min_native=256)
    expected = [i for i in range(2000) if sample_scene(5, i).native_resolution >= 256]
    assert ds.indices.tolist() == expected and len(ds) == len(expected) > 0
    for i in (0, len(ds) - 1):
        meta = json.loads(ds[i]["meta"])
        assert meta["native_resolution"] >= 256 and meta["index"] == expected[i]
    assert "kept" in ds.kept_summary() and str(len(ds)) in ds.kept_summary()
    assert len(ScenesDataset(3000, 32, seed=5)) == 3000


def test_dataset_items_have_the_shared_format():
    ds = ScenesDataset(10, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].max() > 0.9  # light backgrounds
    assert all(isinstance(c, str) and c for c in batch["caption"])
    assert len(set(batch["key"])) == 4
    assert Scene.from_json(batch["meta"][0]).caption == batch["caption"][0]


def test_low_native_images_are_blurry_when_upsampled():
    s = sample_scene(0, next(i for i in range(100) if native_resolution(0, i) < 48))
    sharp = np.asarray(render(s, 256)).astype(float)
    soft = np.asarray(render_native(s, 256)).astype(float)
    grad = lambda a: np.abs(np.diff(a, axis=1)).max()
    assert grad(soft) < 0.6 * grad(sharp)


def test_drawing_large_natives_at_four_times_the_target_matches_full_native_render():
    idx = [i for i in range(2000) if native_resolution(0, i) >= 700][:4]
    assert idx
    for i in idx:
        s = sample_scene(0, i)
        fast = np.asarray(render_native(s, 64)).astype(float)
        full = np.asarray(render_native(s, 64, oversample=None)).astype(float)
        assert np.abs(fast - full).mean() < 0.25 and np.abs(fast - full).max() <= 12


def test_shard_indices_split_without_duplicates_and_cover_every_passing_index():
    shards = [list(itertools.islice(shard_indices(0, k, 4, min_native=128), 200)) for k in range(4)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))
    limit = min(s[-1] for s in shards)
    natives = native_resolutions(0, np.arange(limit + 1))
    assert sorted(i for i in flat if i <= limit) == np.flatnonzero(natives >= 128).tolist()


def test_stream_splits_across_workers_and_ranks_without_duplicates():
    keys = []
    for rank in range(2):
        stream = ScenesStream(32, seed=1, min_native=64, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        keys += [item["key"] for item in itertools.islice(loader, 12)]
    assert len(keys) == len(set(keys)) == 24
    indices = sorted(int(k.split("-")[1]) for k in keys)
    assert all(native_resolution(1, i) >= 64 for i in indices)
    assert {i % 4 for i in indices} == {0, 1, 2, 3}  # four shards (2 ranks × 2 workers)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="resolution"):
        ScenesDataset(10, 0)
    with pytest.raises(ValueError, match="seed"):
        sample_scene(-1, 0)
    with pytest.raises(ValueError, match="min_native"):
        ScenesStream(64, min_native=2048)
    with pytest.raises(ValueError, match="no scene passes"):
        ScenesDataset(3, 64, min_native=1024)
    with pytest.raises(ValueError, match="format"):
        write_dataset("unused", 1, fmt="zip")
    with pytest.raises(ValueError, match="merge them"):
        make_scene([Group("red", "star", "plain", 1), Group("red", "star", "plain", 2)])
    with pytest.raises(ValueError, match="1 to 5 objects"):
        make_scene([Group("red", "star", "plain", 6)])


@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_scenes_cli_writes_n_samples(tmp_path, fmt, capsys):
    out = tmp_path / fmt
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "scenes",
                "--out",
                str(out),
                "--count",
                "12",
                "--resolution",
                "48",
                "--format",
                fmt,
                "--seed",
                "2",
                "--shard-size",
                "5",
            ]
        )
    assert exit_info.value.code == 0
    assert "wrote 12 scenes" in capsys.readouterr().out
    if fmt == "folder":
        samples = {}
        for path in sorted(out.rglob("*.png")):
            samples[path.stem] = {
                "png": path.read_bytes(),
                "txt": path.with_suffix(".txt").read_text(),
                "json": path.with_suffix(".json").read_text(),
            }
        assert len(list(out.glob("*/*.txt"))) == len(list(out.glob("*/*.json"))) == 12
        assert len(list(out.glob("*/"))) == 3  # shards of 5
    else:
        import webdataset as wds

        assert len(list(out.glob("*.tar"))) == 3
        urls = [str(p) for p in sorted(out.glob("*.tar"))]
        samples = {
            s["__key__"]: {"png": s["png"], "txt": s["txt"].decode(), "json": s["json"].decode()}
            for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        }
    assert len(samples) == 12
    for key, s in samples.items():
        meta = json.loads(s["json"])
        index = int(key.split("-")[1])
        assert s["txt"].strip() == meta["caption"] == sample_scene(2, index).caption
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (48, 48) == (meta["width"], meta["height"])
        assert meta["original_width"] == native_resolution(2, index)
    stats = json.loads((out / "scenes_stats.json").read_text())
    natives = native_resolutions(2, np.arange(12))
    assert stats["kept"]["128"] == int((natives >= 128).sum())
