"""Real text–image data: image folders (`FolderDataset`), and `make_dataset`, which builds the
data set of every source (scenes, folder, webdataset shards).

`FolderDataset` (map-style) checks every file's header, caption and size while it builds its
index, so almost everything bad never enters it (what is skipped, and how it is counted:
`greedygrow.data.skips`). What only full decoding reveals (a truncated JPEG) makes
``__getitem__`` return ``None``; load it with ``collate_fn=skip_none_collate`` (also
``FolderDataset.collate_fn``), which drops those and returns ``None`` for a batch with nothing
left. Call ``dataset.skips.log_summary()`` at the end of an epoch.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from greedygrow.data.scenes import ScenesDataset, ScenesStream
from greedygrow.data.shards import WebDatasetStream
from greedygrow.data.skips import (
    IMAGE_EXTENSIONS,
    ImageReader,
    SkipCounter,
    clean_caption,
    native_from,
    original_size,
    parse_json,
    read_caption,
    skip_none_collate,
)

FILE_COLUMNS = ("file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class FolderItem:
    """One indexed image: absolute path, key (relative path without extension), caption and
    stored (width, height)."""

    path: str
    key: str
    caption: str
    size: tuple[int, int]
    original: tuple[int, int] | None = None  # from a sidecar .json (img2dataset's fields)


def _metadata_captions(root: Path, counter: SkipCounter) -> dict[str, str | None]:
    """Captions from every metadata.jsonl / metadata.csv under root: absolute path → caption.

    File names are relative to the metadata file's folder (the Hugging Face imagefolder
    convention). A caption cell that is absent or not a string maps to None (missing).
    """
    captions: dict[str, str | None] = {}
    for dirpath, _, files in sorted(os.walk(root)):
        for meta_path in [os.path.join(dirpath, name) for name in METADATA_FILES if name in files]:
            try:
                rows = list(_metadata_rows(meta_path, counter))
            except UnicodeDecodeError as e:  # the whole file, not the rows read before the error
                counter.skip("bad_caption", meta_path, f"not UTF-8 text ({e}); re-save as UTF-8")
                continue
            if rows:  # the first row (CSV: the header) names the columns
                file_col = _column(rows[0][1], FILE_COLUMNS, meta_path)
                cap_col = _column(rows[0][1], CAPTION_COLUMNS, meta_path)
            for line_no, row in rows:
                rel, value = row.get(file_col), row.get(cap_col)
                if not isinstance(rel, str) or not rel:
                    counter.skip("missing_image", f"{meta_path}:{line_no}", f"no {file_col}")
                    continue
                path = os.path.normpath(os.path.join(dirpath, rel))
                captions.setdefault(path, value if isinstance(value, str) else None)
    return captions


def _metadata_rows(meta_path: str, counter: SkipCounter) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(meta_path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark
        if meta_path.endswith(".csv"):
            for i, row in enumerate(csv.DictReader(f), start=2):
                yield i, {k.strip().lower(): v for k, v in row.items() if k is not None}
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                counter.skip("bad_caption", f"{meta_path}:{i}", f"invalid JSON: {e}")
                continue
            if isinstance(obj, dict):
                yield i, {str(k).strip().lower(): v for k, v in obj.items()}
            else:
                counter.skip("bad_caption", f"{meta_path}:{i}", "line is not a JSON object")


def _column(row: dict[str, Any], names: Sequence[str], meta_path: str) -> str:
    for name in names:
        if name in row:
            return name
    raise ValueError(
        f"{meta_path}: no column named any of {list(names)} (found {sorted(row)}); "
        f"rename the file-name and caption columns to e.g. 'file_name' and 'caption'"
    )


def _probe(path: str) -> tuple[int, int] | Exception | None:
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
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # absent, unreadable or a directory: no sidecar
        return None


class FolderDataset(ImageReader, Dataset):
    """Images under ``root`` (recursively) with captions, as a map-style dataset.

    A caption comes from a ``metadata.jsonl`` / ``metadata.csv`` row (file-name column one of
    FILE_COLUMNS, caption column one of CAPTION_COLUMNS, paths relative to that file), else from
    a sidecar ``<stem>.txt``, else from a sidecar ``<stem>.json``'s "caption". The index is built
    from headers only (Pillow opens lazily), so the ``min_native`` filter is cheap; ``count``
    keeps a seeded random subset of that many images. ``__getitem__`` returns ``None`` for an
    image that fails to decode at load time; use `skip_none_collate` (module docstring).
    Training crops draw from Python's `random`, which DataLoader seeds in every worker.
    """

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
        paths = sorted(
            os.path.normpath(os.path.join(d, f))
            for d, _, files in os.walk(self.root)
            for f in files
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        )
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
            if path in captions:
                caption, reason = clean_caption(captions[path])
            else:
                caption, reason = read_caption(_read_optional(stem + ".txt"), meta)
            if reason:
                self.skips.skip(reason, path)
                continue
            original = original_size(meta)
            if min(native_from(size, original)) < self.min_native:
                self.skips.drop_small()
                continue
            key = Path(os.path.relpath(path, self.root)).with_suffix("").as_posix()
            items.append(FolderItem(path, key, caption, size, original))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        loaded = self._load(item.path, item.path)
        if loaded is None:
            return None
        image, size = loaded
        rel = Path(os.path.relpath(item.path, self.root)).as_posix()
        native = list(native_from(size, item.original))
        meta = json.dumps({"source": "folder", "path": rel, "native_size": native})
        return {"image": image, "caption": item.caption, "key": item.key, "meta": meta}


def make_dataset(
    source: str,
    path: str | os.PathLike | Sequence[str] | None,
    resolution: int,
    train: bool = True,
    min_native: int = 0,
    seed: int = 0,
    count: int | None = None,
) -> Dataset | IterableDataset:
    """The data set named by ``source``:

    * ``"scenes"``: generated, no path; ``count`` given → ScenesDataset of that size, else the
      endless ScenesStream.
    * ``"folder"``: `FolderDataset` at ``path``; ``count`` keeps a seeded subset of that size.
    * ``"webdataset"``: `WebDatasetStream` over the shards ``path``; training resamples shards
      (``count`` = samples per epoch, None = endless), evaluation is one exact pass (capped at
      ``count``).
    """
    if source == "scenes":
        if path not in (None, ""):
            raise ValueError(
                f"scenes are generated and take no path (got {path!r}); to read scenes written "
                f"with `greedygrow scenes`, use source 'folder' or 'webdataset'"
            )
        if count is not None:
            return ScenesDataset(count, resolution, seed, min_native=min_native, train=train)
        return ScenesStream(resolution, seed, min_native=min_native, train=train)
    if path in (None, ""):
        raise ValueError(f"data source {source!r} needs a path")
    if source == "folder":
        return FolderDataset(path, resolution, train, min_native, count=count, seed=seed)
    if source == "webdataset":
        return WebDatasetStream(path, resolution, train, min_native, epoch_size=count, seed=seed)
    raise ValueError(f"unknown data source {source!r}; expected 'scenes', 'folder' or 'webdataset'")
