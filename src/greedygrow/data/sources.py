"""Real data: counting skipped bad input, reads both readers share, and `FolderDataset`."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate, get_worker_info

from greedygrow.data.transforms import native_size, prepare_image

log = logging.getLogger("greedygrow.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SKIP_REASONS = (
    "empty_file",
    "not_an_image",
    "corrupt_image",
    "too_large",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",
    "broken_shard",
)
_FIELDS = ("kept", "below_min_native", *SKIP_REASONS)
_MAX_WORKERS = 64  # DataLoader workers with a row of their own (more share rows)
_WARN_SLOTS = 1 << 22  # hashed warned-about paths: a collision can only suppress a warning
BROKEN = object()  # a .json payload that does not parse
Size = tuple[int, int]  # (width, height) in pixels


class SkipCounter:
    """Kept, dropped and skipped counts in shared memory: row 0 this process, 1 + w worker w."""

    def __init__(self, name: str = "data"):
        self.name = name
        self._table = torch.zeros(1 + _MAX_WORKERS, len(_FIELDS), dtype=torch.int64).share_memory_()
        self._warned = torch.zeros(_WARN_SLOTS, dtype=torch.uint8).share_memory_()

    def _add(self, field: str, n: int = 1) -> None:
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % _MAX_WORKERS
        self._table.numpy()[row, _FIELDS.index(field)] += n

    def keep(self, n: int = 1) -> None:
        """Count ``n`` samples that passed every check."""
        self._add("kept", n)

    def drop_small(self) -> None:
        """Count a sample dropped by the native-resolution filter (no warning: it is expected)."""
        self._add("below_min_native")

    def skip(self, reason: str, path: str, detail: str = "") -> None:
        """Count a bad sample and warn the first time this path is skipped."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self._add(reason)
        warned = self._warned.numpy()
        slot = zlib.crc32(path.encode()) % len(warned)
        if not warned[slot]:
            warned[slot] = 1
            detail = f" ({detail})" if detail else ""
            log.warning("%s: skipping %s: %s%s", self.name, path, reason, detail)

    def skip_image(self, path: str, e: Exception) -> None:
        """Count and warn about an image Pillow failed on, by what `e` says went wrong."""
        if isinstance(e, UnidentifiedImageError):
            self.skip("not_an_image", path, "Pillow cannot identify the format")
        elif isinstance(e, Image.DecompressionBombError):
            self.skip("too_large", path, str(e))
        else:
            self.skip("corrupt_image", path, f"{type(e).__name__}: {e}")

    def as_dict(self) -> dict[str, int]:
        """All counts summed over processes: kept, below_min_native and every skip reason."""
        return dict(zip(_FIELDS, self._table.sum(0).tolist(), strict=True))

    @property
    def kept(self) -> int:
        return self.as_dict()["kept"]

    @property
    def below_min_native(self) -> int:
        return self.as_dict()["below_min_native"]

    @property
    def counts(self) -> dict[str, int]:
        """Non-zero skip counts of bad input, by reason."""
        return {k: v for k, v in self.as_dict().items() if k in SKIP_REASONS and v}

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "none"
        return (
            f"{self.name}: kept {self.kept}, below min_native {self.below_min_native}, "
            f"bad input skipped {self.skipped} ({bad})"
        )

    def log_summary(self) -> None:
        """Log `summary()`: at WARNING level if bad input was skipped, else INFO."""
        log.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    def reset(self) -> None:
        """Zero the counts (e.g. at the start of an epoch); warned paths stay warned."""
        self._table.zero_()


def skip_none_collate(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """`default_collate` of the samples that are not ``None``; ``None`` if none is left."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None


class ImageReader:
    """What both real-data readers share: their sizes, a `SkipCounter`, and loading an image."""

    def _setup(self, resolution: int, train: bool, min_native: int, name: str) -> None:
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
        if not isinstance(min_native, int) or min_native < 0:
            raise ValueError(f"min_native must be a number of pixels >= 0, got {min_native!r}")
        self.resolution, self.train, self.min_native = resolution, bool(train), min_native
        self.skips = SkipCounter(name)

    def _load(
        self, file: str | io.BytesIO, where: str, original: Size | None, rng: random.Random | None
    ) -> tuple[torch.Tensor, list[int]] | None:
        """(image tensor, native size), or None if it is bad (skipped) or small (dropped)."""
        try:
            with Image.open(file) as img:
                if min(native_from(img.size, original)) < self.min_native:
                    self.skips.drop_small()
                    return None
                native = list(native_from(native_size(img), original))  # before any draft
                return prepare_image(img, self.resolution, self.train, rng), native
        except Exception as e:  # any failure to read the image is bad input: count, warn, skip
            self.skips.skip_image(where, e)
            return None


def parse_json(data: str | bytes | None) -> Any:
    """A .json payload parsed; None when absent, `BROKEN` when not UTF-8 JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return BROKEN


def read_caption(txt: bytes | None, meta: Any) -> tuple[str | None, str]:
    """(caption, "") from a .txt payload, else the parsed .json's "caption"; or (None, reason)."""
    caption = None
    if txt is not None:
        try:
            caption = txt.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "bad_caption"
    if not caption and meta is BROKEN:
        return None, "bad_caption"
    if not caption and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"].strip()
    if caption is None:
        return None, "missing_caption"
    return (caption, "") if caption else (None, "empty_caption")


def original_size(meta: Any) -> Size | None:
    """img2dataset's original_width/original_height, when the json has both as positive ints."""
    if not isinstance(meta, dict):
        return None
    w, h = meta.get("original_width"), meta.get("original_height")
    return (w, h) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else None


def native_from(size: Size, original: Size | None) -> Size:
    """Native size: img2dataset's `original` when smaller (upscaled), turned like `size`."""
    if original is None or min(original) >= min(size):
        return size
    return original if (original[0] >= original[1]) == (size[0] >= size[1]) else original[::-1]


FILE_COLUMNS = ("file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class FolderItem:
    """One indexed image: absolute path, key (relative path without extension), caption."""

    path: str
    key: str
    caption: str
    original: Size | None = None  # from a sidecar .json (img2dataset's fields)


def _metadata_captions(root: Path, counter: SkipCounter) -> dict[str, dict[str, Any]]:
    """Absolute path → {"caption": its row's caption} from every metadata file under root."""
    captions: dict[str, dict[str, Any]] = {}
    for dirpath, _, files in sorted(os.walk(root)):
        for meta_path in [os.path.join(dirpath, name) for name in METADATA_FILES if name in files]:
            if not (rows := _metadata_rows(meta_path, counter)):
                continue
            file_col = _column(rows[0][1], FILE_COLUMNS, meta_path)  # the first row names them
            cap_col = _column(rows[0][1], CAPTION_COLUMNS, meta_path)
            for line_no, row in rows:
                rel, value = row.get(file_col), row.get(cap_col)
                if not isinstance(rel, str) or not rel:
                    counter.skip("missing_image", f"{meta_path}:{line_no}", f"no {file_col}")
                    continue
                path = os.path.normpath(os.path.join(dirpath, rel))
                captions.setdefault(path, {"caption": value})
    return captions


def _metadata_rows(meta_path: str, counter: SkipCounter) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row by lower-case column name) of a metadata file; bad lines counted."""
    try:
        with open(meta_path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's BOM
            text = io.StringIO(f.read(), newline="")
    except UnicodeDecodeError as e:  # the whole file, not the rows before the error
        counter.skip("bad_caption", meta_path, f"not UTF-8 text ({e}); re-save as UTF-8")
        return []
    if meta_path.endswith(".csv"):
        rows = enumerate(csv.DictReader(text), start=2)
    else:
        rows = ((i, parse_json(line)) for i, line in enumerate(text, start=1) if line.strip())
    kept = []
    for i, row in rows:
        if isinstance(row, dict):
            kept.append((i, {str(k).strip().lower(): v for k, v in row.items() if k is not None}))
        else:
            counter.skip("bad_caption", f"{meta_path}:{i}", "not a JSON object")
    return kept


def _column(row: dict[str, Any], names: Sequence[str], meta_path: str) -> str:
    for name in names:
        if name in row:
            return name
    raise ValueError(
        f"{meta_path}: no column named any of {list(names)} (found {sorted(row)}); "
        f"rename the file-name and caption columns to e.g. 'file_name' and 'caption'"
    )


def _probe(path: str) -> Size | Exception | None:
    """Header check of one image file: its stored size, the exception, or None if empty."""
    try:
        if os.path.getsize(path) == 0:
            return None
        with Image.open(path) as img:
            return img.size
    except Exception as e:  # any failure to read a header is bad input, never a crash
        return e


def _read_optional(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:  # absent, unreadable or a directory: no sidecar
        return None


class FolderDataset(ImageReader, Dataset):
    """Images under ``root`` with captions (docs/data.md); an undecodable item is ``None``."""

    collate_fn = staticmethod(skip_none_collate)

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        train: bool = True,
        min_native: int = 0,
        count: int | None = None,
        seed: int = 0,
    ):
        self.root = Path(root).resolve()
        self._setup(resolution, train, min_native, f"folder {self.root}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder data set: {self.root} is not a directory")
        self.items = self._index()
        if count is not None and count < len(self.items):
            keep = sorted(random.Random(seed).sample(range(len(self.items)), count))
            self.items = [self.items[i] for i in keep]
        self.skips.keep(len(self.items))
        self.skips.log_summary()
        if not self.items:
            raise ValueError(
                f"folder data set {self.root}: no usable image ({self.skips.summary()}); "
                f"check the captions, the image files and min_native={self.min_native}"
            )

    def _index(self) -> list[FolderItem]:
        captions = _metadata_captions(self.root, self.skips)
        found = (p for p in self.root.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS)
        paths = sorted(str(p) for p in found if p.is_file())
        for path in sorted(set(captions) - set(paths)):
            self.skips.skip("missing_image", path, "listed in metadata but not found")
        with ThreadPoolExecutor(8) as pool:  # header reads wait on the disk, not the GIL
            probes = list(pool.map(_probe, paths))
        items = []
        for path, size in zip(paths, probes, strict=True):
            if not isinstance(size, tuple):
                if size is None:
                    self.skips.skip("empty_file", path)
                else:
                    self.skips.skip_image(path, size)
                continue
            stem = os.path.splitext(path)[0]
            meta = parse_json(_read_optional(stem + ".json"))  # caption, img2dataset's sizes
            txt = None if path in captions else _read_optional(stem + ".txt")
            caption, reason = read_caption(txt, captions.get(path, meta))  # metadata rows first
            if reason:
                self.skips.skip(reason, path)
                continue
            original = original_size(meta)
            if min(native_from(size, original)) < self.min_native:
                self.skips.drop_small()
                continue
            key = Path(os.path.relpath(path, self.root)).with_suffix("").as_posix()
            items.append(FolderItem(path, key, caption, original))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        """Item `index`'s caption, without reading its image."""
        return self.items[index].caption

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        if (loaded := self._load(item.path, item.path, item.original, None)) is None:
            return None
        rel = Path(os.path.relpath(item.path, self.root)).as_posix()
        meta = json.dumps({"source": "folder", "path": rel, "native_size": loaded[1]})
        return {"image": loaded[0], "caption": item.caption, "key": item.key, "meta": meta}
