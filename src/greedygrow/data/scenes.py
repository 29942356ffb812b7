"""Scenes: procedural text–image pairs with ground truth, the default data set (docs/data.md)."""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset
from tqdm import tqdm

from greedygrow.atomic import atomic_write_json
from greedygrow.data.draw import BACKGROUNDS, COLORS, check_resolution, render_native, shape_box
from greedygrow.data.draw import OUTLINE_WIDTH as OUTLINE_WIDTH  # evaluate imports these here
from greedygrow.data.draw import TINT as TINT
from greedygrow.data.draw import render as render
from greedygrow.data.split import consumer, uniforms
from greedygrow.data.transforms import to_tensor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
ATTRIBUTES: tuple[str, ...] = ("plain", "striped", "dotted", "outlined")
ATTRIBUTE_WEIGHTS: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
# (colour, shape) pairs that sample_scene never draws: evaluation prompts ask for them, to
# test composition beyond the combinations seen in training (ours; cf. DSG's held-out split).
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "star"), ("orange", "circle"), ("green", "triangle")}
)
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 5
MAX_GROUPS = 3
TEMPLATES: tuple[str, ...] = (
    "{objs}",
    "a picture with {objs}",
    "an image of {objs}",
    "a drawing of {objs}",
    "{objs} on a {bg} background",
    "there {be} {objs}",
    "a simple illustration of {objs}",
    "a flat graphic showing {objs}",
)

# Native resolution: log-uniform within octave [lo, 2 lo), drawn with these probabilities
NATIVE_OCTAVES: tuple[int, ...] = (32, 64, 128, 256, 512)
NATIVE_OCTAVE_PROBS: tuple[float, ...] = (0.30, 0.38, 0.20, 0.085, 0.035)
NATIVE_MIN, NATIVE_MAX = 32, 1024
EDGE_MARGIN = 0.03  # free border around the image, as a fraction of its side
GAP = 0.04  # minimum free space between two objects' boxes, as a fraction of the side
GROUND_TRUTH_VERSION = 1
KEPT_THRESHOLDS = (64, 128, 256, 512, 1024)
IMAGE_FORMATS = {
    "png": {"format": "PNG", "compress_level": 3},
    "jpg": {"format": "JPEG", "quality": 95},
}


@dataclass(frozen=True)
class Group:
    """A counted phrase of the caption: `count` identical (colour, shape, attribute) objects."""

    color: str
    shape: str
    attribute: str
    count: int


@dataclass(frozen=True)
class SceneObject:
    """One object: its tight `box` (x0, y0, x1, y1) in image fractions, `group` its group."""

    color: str
    shape: str
    attribute: str
    box: tuple[float, float, float, float]
    group: int


@dataclass(frozen=True)
class Background:
    """Plain colour, or a linear gradient from `color` to `color2` along `angle` degrees."""

    kind: str
    name: str
    color: tuple[int, int, int]
    color2: tuple[int, int, int]
    angle: float


@dataclass(frozen=True)
class Scene:
    """A sampled scene: what to draw, its caption and its native resolution."""

    caption: str
    native_resolution: int
    background: Background
    groups: tuple[Group, ...]
    objects: tuple[SceneObject, ...]
    seed: int | None = None
    index: int | None = None

    @property
    def count(self) -> int:
        """Total number of objects."""
        return len(self.objects)

    def to_dict(self) -> dict[str, Any]:
        """The ground truth as plain JSON data (schema in docs/data.md)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """The ground truth as a JSON string (floats round-trip exactly)."""
        return json.dumps({"version": GROUND_TRUTH_VERSION, **asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`; also accepts the minimal schema without groups/group fields."""
        try:
            entries, caption = list(d["objects"]), str(d["caption"])
            native, bg = int(d["native_resolution"]), d.get("background") or {"name": "white"}
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"scene ground truth: missing or malformed field {e}; expected keys "
                "'caption', 'native_resolution', 'objects' (schema: docs/data.md)"
            ) from None
        keys = [_object_key(o, i) for i, o in enumerate(entries)]
        if (raw := d.get("groups")) is None:  # identical objects, in order of first appearance
            groups = tuple(Group(*key, count=n) for key, n in Counter(keys).items())
        else:
            groups = tuple(
                Group(g["color"], g["shape"], g["attribute"], int(g["count"])) for g in raw
            )
        lookup = {_group_key(g): k for k, g in enumerate(groups)}
        objs = []
        for i, (o, key) in enumerate(zip(entries, keys, strict=True)):
            k = int(o.get("group", lookup.get(key, -1)))
            if not 0 <= k < len(groups) or key != _group_key(groups[k]):
                raise ValueError(f"scene ground truth: object {i} {key} matches no group")
            objs.append(SceneObject(*key, box=tuple(float(v) for v in o["box"]), group=k))
        name = str(bg.get("name", ""))
        color = tuple(bg.get("color", BACKGROUNDS.get(name, BACKGROUNDS["white"])))
        color2 = tuple(bg.get("color2", color))
        background = Background(
            str(bg.get("kind", "plain")), name, color, color2, float(bg.get("angle", 0.0))
        )
        return cls(caption, native, background, groups, tuple(objs), d.get("seed"), d.get("index"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))


def _group_key(g: Group) -> tuple[str, str, str]:
    return (g.color, g.shape, g.attribute)


def _object_key(o: dict[str, Any], i: int) -> tuple[str, str, str]:
    """An object entry's (colour, shape, attribute); a clear error if it cannot be drawn."""
    for field, allowed in (("color", COLORS), ("shape", SHAPES), ("attribute", ATTRIBUTES)):
        if o.get(field) not in allowed:
            raise ValueError(
                f"scene ground truth: object {i} has {field} {o.get(field)!r}; "
                f"expected one of {sorted(allowed)}"
            )
    box = o.get("box")
    ok = isinstance(box, (list, tuple)) and len(box) == 4 and box[0] < box[2] and box[1] < box[3]
    if not ok:
        raise ValueError(f"scene ground truth: object {i} box {box!r} is not [x0, y0, x1, y1]")
    return (o["color"], o["shape"], o["attribute"])


def native_resolutions(seed: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Native resolution (side in px) of each scene `(seed, index)`, without sampling it."""
    _check_seed(seed)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError(f"scene indices must be >= 0, got {int(idx.min())}")
    lows = np.array(NATIVE_OCTAVES, dtype=np.float64)
    cdf = np.cumsum(NATIVE_OCTAVE_PROBS)
    octave = np.searchsorted(cdf / cdf[-1], uniforms(seed, idx, 1), side="right")
    side = lows[octave] * np.exp2(uniforms(seed, idx, 2))  # log-uniform in [lo, 2 lo)
    return np.clip(np.floor(side), NATIVE_MIN, NATIVE_MAX).astype(np.int64)


def native_resolution(seed: int, index: int) -> int:
    """Native resolution of one scene (cheap: no sampling, no rendering)."""
    return int(native_resolutions(seed, [index])[0])


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**60:
        raise ValueError(f"scenes seed must be an integer in [0, 2**60), got {seed!r}")


def sample_scene(seed: int, index: int) -> Scene:
    """The scene `(seed, index)`: deterministic, independent of any global RNG."""
    native = native_resolution(seed, index)
    rng = np.random.default_rng([seed, index, 0x5CE7E5])
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    n_groups = int(rng.integers(1, min(n, MAX_GROUPS) + 1))
    cuts = np.sort(rng.choice(n - 1, n_groups - 1, replace=False) + 1) if n_groups > 1 else []
    counts = np.diff([0, *cuts, n])  # a random composition of n into n_groups parts
    groups: list[Group] = []
    colors, probs = list(COLORS), np.array(ATTRIBUTE_WEIGHTS) / sum(ATTRIBUTE_WEIGHTS)
    for c in counts:
        while True:
            color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
            g = Group(color, shape, ATTRIBUTES[rng.choice(len(ATTRIBUTES), p=probs)], int(c))
            if (g.color, g.shape) not in HELD_OUT and _group_key(g) not in map(_group_key, groups):
                break
        groups.append(g)
    background = _sample_background(rng)
    objects = _place(rng, groups)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = make_caption(groups, template, background, "one" if rng.random() < 0.2 else "a")
    return Scene(caption, native, background, tuple(groups), objects, seed, index)


def _sample_background(rng: np.random.Generator) -> Background:
    names = list(BACKGROUNDS)
    name = names[rng.integers(len(names))]
    color = BACKGROUNDS[name]
    if rng.random() < 0.5:
        return Background("plain", name, color, color, 0.0)
    other = names[rng.integers(len(names))]
    color2 = BACKGROUNDS[other] if other != name else tuple(round(c * 0.92) for c in color)
    return Background("gradient", name, color, color2, round(float(rng.uniform(0.0, 360.0)), 3))


def _layout(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """n square cells (x, y, side) inside the margins, at least GAP apart, in random order."""
    s_max = min(0.5, 0.6 / math.sqrt(n))
    sizes = np.sort(rng.uniform(0.55 * s_max, s_max, n))[::-1]  # place the largest first
    scale = 1.0
    while True:
        cells: list[tuple[float, float, float]] = []
        for s in sizes * scale:
            for _ in range(50):
                x, y = rng.uniform(EDGE_MARGIN, 1.0 - EDGE_MARGIN - s, 2)
                if all(
                    x + s + GAP <= cx
                    or cx + cs + GAP <= x
                    or y + s + GAP <= cy
                    or cy + cs + GAP <= y
                    for cx, cy, cs in cells
                ):
                    cells.append((float(x), float(y), float(s)))
                    break
            else:
                break
        if len(cells) == n:
            return [cells[i] for i in rng.permutation(n)]
        scale *= 0.9  # crowded: shrink every object and lay out again


def _place(rng: np.random.Generator, groups: Sequence[Group]) -> tuple[SceneObject, ...]:
    """The groups' objects in `_layout`'s cells, each in the tight box of its shape."""
    owners = [k for k, g in enumerate(groups) for _ in range(g.count)]
    cells = _layout(rng, len(owners))
    return tuple(
        SceneObject(*_group_key(groups[k]), box=shape_box(groups[k].shape, cell), group=k)
        for k, cell in zip(owners, cells, strict=True)
    )


def _phrase(g: Group, one: str) -> str:
    words = [g.attribute] if g.attribute != "plain" else []
    words += [g.color, g.shape + ("s" if g.count > 1 else "")]
    if g.count > 1:
        count = COUNT_WORDS[g.count]
    elif one == "one":
        count = "one"
    else:
        count = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([count, *words])


def make_caption(groups: Sequence[Group], template: str, bg: Background, one: str = "a") -> str:
    """Caption from a template with {objs}, {bg}, {be}; a single object is "a"/"an" or `one`."""
    phrases = [_phrase(g, one) for g in groups]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    bg_word = bg.name if bg.kind == "plain" else "shaded"
    return template.format(objs=objs, bg=bg_word, be="is" if groups[0].count == 1 else "are")


_NUMBERS = {"a": 1, "an": 1, **{w: i for i, w in enumerate(COUNT_WORDS)}}
_PHRASE_RE = re.compile(
    r"\b(an|a|one|two|three|four|five)\s+"
    rf"(?:({'|'.join(a for a in ATTRIBUTES if a != 'plain')})\s+)?"
    rf"({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(s?)\b"
)


def parse_caption(caption: str) -> list[Group]:
    """The counted phrases of a scenes caption, in order ("two striped red stars" → Group)."""
    return [
        Group(color=m[3], shape=m[4], attribute=m[2] or "plain", count=_NUMBERS[m[1]])
        for m in _PHRASE_RE.finditer(caption.lower())
    ]


def make_scene(groups: Sequence[Group], seed: int = 0, background: str = "white") -> Scene:
    """A scene with the given groups (e.g. an evaluation prompt), laid out from `seed`, 256 px."""
    _check_seed(seed)
    if not 1 <= sum(g.count for g in groups) <= MAX_OBJECTS or any(g.count < 1 for g in groups):
        raise ValueError(
            f"a scene holds 1 to {MAX_OBJECTS} objects, got counts {[g.count for g in groups]}"
        )
    for i, g in enumerate(groups):
        _object_key({**asdict(g), "box": [0, 0, 1, 1]}, i)
    if len({_group_key(g) for g in groups}) != len(groups):
        raise ValueError("make_scene: two groups share colour, shape and attribute; merge them")
    color = BACKGROUNDS[background]
    bg = Background("plain", background, color, color, 0.0)
    objects = _place(np.random.default_rng([seed, 0x6D616B65]), groups)
    return Scene(make_caption(groups, "{objs}", bg), 256, bg, tuple(groups), objects, seed, None)


def scene_key(seed: int, index: int) -> str:
    """Stable sample key (no dots, so webdataset keeps it whole)."""
    return f"s{seed}-{index:09d}"


def scene_item(seed: int, index: int, resolution: int) -> dict[str, Any]:
    """One data set item: {"image": [3, R, R] in [−1, 1], "caption", "key", "meta"}."""
    scene = sample_scene(seed, index)
    return {
        "image": to_tensor(render_native(scene, resolution)),
        "caption": scene.caption,
        "key": scene_key(seed, index),
        "meta": scene.to_json(),
    }


def _init(ds: Dataset, resolution: int, seed: int, min_native: int) -> None:
    """Check the arguments ScenesDataset and ScenesStream share, and set them on `ds`."""
    check_resolution(resolution)
    _check_seed(seed)
    if not isinstance(min_native, (int, np.integer)) or not 0 <= min_native <= NATIVE_MAX:
        raise ValueError(
            f"min_native must be an integer in [0, {NATIVE_MAX}] px (no scene is larger, so "
            f"none would pass), got {min_native!r}"
        )
    ds.resolution, ds.seed, ds.min_native = resolution, seed, min_native


class ScenesDataset(Dataset):
    """Scenes 0..count−1 of `seed` whose native resolution is at least `min_native`."""

    def __init__(self, count: int, resolution: int, seed: int = 0, min_native: int = 0) -> None:
        _init(self, resolution, seed, min_native)
        self.total = int(count)
        self.indices = np.flatnonzero(native_resolutions(seed, np.arange(count)) >= min_native)
        if len(self.indices) == 0:
            raise ValueError(
                f"ScenesDataset(count={count}, min_native={min_native}): no scene passes the "
                "native-resolution filter; use a larger count or a lower min_native"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return scene_item(self.seed, int(self.indices[i]), self.resolution)

    def caption(self, i: int) -> str:
        """Item i's caption, without drawing it."""
        return sample_scene(self.seed, int(self.indices[i])).caption

    def pixels(self, i: int) -> np.ndarray:
        """Item i's image as uint8 [3, R, R]: its `image` is `to_tensor` of these pixels."""
        image = render_native(sample_scene(self.seed, int(self.indices[i])), self.resolution)
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def kept_summary(self) -> str:
        """How many scenes passed the native-resolution filter."""
        return (
            f"scenes: kept {len(self)} of {self.total} "
            f"({100 * len(self) / self.total:.1f}%) with native resolution >= {self.min_native} px"
        )


def shard_indices(seed: int, shard: int, shards: int, min_native: int = 0) -> Iterator[int]:
    """Endless scene indices ≡ shard (mod shards) whose native resolution passes `min_native`."""
    for first in range(shard, 2**62, 4096 * shards):  # blocks of 4096 indices per shard
        idx = np.arange(first, first + 4096 * shards, shards, dtype=np.int64)
        if min_native > NATIVE_MIN:
            idx = idx[native_resolutions(seed, idx) >= min_native]
        yield from idx.tolist()


class ScenesStream(IterableDataset):
    """Endless scenes of `seed`, split over DataLoader workers and ranks without duplicates."""

    def __init__(
        self,
        resolution: int,
        seed: int = 0,
        min_native: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _init(self, resolution, seed, min_native)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = consumer(self.rank, self.world_size)
        for index in shard_indices(self.seed, shard, shards, self.min_native):
            yield scene_item(self.seed, index, self.resolution)


def scene_sample(seed: int, index: int, resolution: int | None, ext: str) -> dict[str, Any]:
    """One sample as img2dataset writes it: __key__, the image (`ext`), txt and json."""
    scene, key = sample_scene(seed, index), scene_key(seed, index)
    image = render_native(scene, resolution)
    meta = {
        **scene.to_dict(),
        "key": key,
        "status": "success",
        "width": image.width,
        "height": image.height,
        "original_width": scene.native_resolution,
        "original_height": scene.native_resolution,
    }
    buf = io.BytesIO()
    image.save(buf, **IMAGE_FORMATS[ext])
    return {
        "__key__": key,
        ext: buf.getvalue(),
        "txt": scene.caption.encode(),
        "json": json.dumps(meta, separators=(",", ":")).encode(),
    }


def write_dataset(
    out: str | Path,
    count: int,
    resolution: int | None = None,
    fmt: str = "folder",
    seed: int = 0,
    image_format: str = "png",
    shard_size: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Write scenes 0..count−1 to `out` (docs/data.md); returns ``scenes_stats.json``'s data."""
    if count < 1 or shard_size < 1:
        raise ValueError(f"scenes count and shard size must be >= 1, got {count}, {shard_size}")
    if fmt not in ("folder", "webdataset"):
        raise ValueError(f"unknown format {fmt!r}; expected 'folder' or 'webdataset'")
    if resolution is not None:
        check_resolution(resolution)
    natives = native_resolutions(seed, np.arange(count))  # checks the seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = tqdm(range(count), desc=f"scenes → {out}", unit="scene", disable=not progress)
    samples = ((i, scene_sample(seed, i, resolution, image_format)) for i in indices)
    if fmt == "webdataset":
        with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0, mtime=0) as w:
            for _, sample in samples:
                w.write(sample)
    else:
        for index, sample in samples:
            folder = out / f"{index // shard_size:05d}"
            folder.mkdir(exist_ok=True)
            key = sample.pop("__key__")
            for ext, data in sample.items():  # a folder's .txt ends with a newline
                (folder / f"{key}.{ext}").write_bytes(data + b"\n" * (ext == "txt"))
    summary = {
        "count": int(count),
        "format": fmt,
        "image_format": image_format,
        "resolution": resolution,
        "seed": seed,
        "shards": (count + shard_size - 1) // shard_size,
        "kept": {str(t): int((natives >= t).sum()) for t in KEPT_THRESHOLDS},
    }
    atomic_write_json(out / "scenes_stats.json", summary)
    return summary
