"""Real text–image data: image folders and img2dataset-style WebDataset tar shards.

Both readers yield the data contract's dicts ``{"image": FloatTensor[3, R, R] in [−1, 1],
"caption": str, "key": str, "meta": JSON str}`` (transforms in `greedygrow.data.transforms`).

Bad input never crashes and never becomes a default image. A zero-byte file, a file that is
not an image, a truncated or corrupt image, a missing or empty caption, a broken tar shard:
each is skipped, counted by reason in a `SkipCounter` and warned about once per path (logger
``greedygrow.data``). Images whose native shorter side is below ``min_native`` (the paper's
high-resolution subset) are dropped and counted, without a warning.

How each reader skips:

* `FolderDataset` (map-style) checks every file's header, caption and size while it builds its
  index, so almost everything bad never enters it. What only full decoding reveals (a truncated
  JPEG) makes ``__getitem__`` return ``None``; load it with ``collate_fn=skip_none_collate``
  (also ``FolderDataset.collate_fn``), which drops those and returns ``None`` for a batch with
  nothing left. Call ``dataset.skips.log_summary()`` at the end of an epoch.
* `WebDatasetStream` (iterable) simply does not yield bad samples, and logs its counts when a
  finite pass ends. Exact passes split the shards across ranks × DataLoader workers so every
  sample is read exactly once (see `plan_shards`); training streams resample shards.

Counts from DataLoader workers land in shared memory, so ``dataset.skips`` in the main process
is up to date. Counters are per rank; reduce ``skips.as_dict()`` across ranks if you want totals.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from greedygrow.data.split import rank_and_world
from greedygrow.data.transforms import native_size, prepare_image

log = logging.getLogger("greedygrow.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FILE_COLUMNS = ("file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SKIP_REASONS = (
    "empty_file",  # zero bytes
    "not_an_image",  # Pillow cannot identify the format (e.g. a text file named .png)
    "corrupt_image",  # identified, but decoding fails (truncated, broken data stream)
    "too_large",  # over Pillow's decompression-bomb limit
    "missing_image",  # a caption or tar sample without its image
    "missing_caption",  # an image without any caption source
    "empty_caption",  # a caption that is empty after stripping whitespace
    "bad_caption",  # caption not valid UTF-8, or its JSON does not parse
    "broken_shard",  # a tar shard that cannot be opened or read to its end
)
_FIELDS = ("kept", "below_min_native", *SKIP_REASONS)


class SkipCounter:
    """Kept, dropped (below ``min_native``) and skipped (bad input, by reason) sample counts.

    The counts live in a shared-memory table with one row per process (row 0: the process that
    made the counter, row 1 + w: DataLoader worker w), so DataLoader workers need no locks and
    the main process sees their counts. Warnings are issued once per path across workers and
    epochs, through a shared table of hashed paths (a hash collision can suppress a warning,
    never a count).
    """

    def __init__(self, name: str = "data", max_workers: int = 64, warn_table_bytes: int = 1 << 20):
        self.name = name
        self._table = torch.zeros(1 + max_workers, len(_FIELDS), dtype=torch.int64)
        self._table.share_memory_()
        self._warned = torch.zeros(warn_table_bytes, dtype=torch.uint8).share_memory_()
        self._views: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = None  # numpy views are rebuilt in the receiving process
        return state

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._views is None:
            self._views = (self._table.numpy(), self._warned.numpy())
        return self._views

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (self._table.shape[0] - 1)

    def keep(self, n: int = 1) -> None:
        """Count ``n`` samples that passed every check."""
        self._arrays()[0][self._row(), 0] += n

    def drop_small(self) -> None:
        """Count a sample dropped by the native-resolution filter (no warning: it is expected)."""
        self._arrays()[0][self._row(), 1] += 1

    def skip(self, reason: str, path: str, detail: str = "") -> None:
        """Count a bad sample and warn the first time this path is skipped."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        table, warned = self._arrays()
        table[self._row(), _FIELDS.index(reason)] += 1
        h = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
        byte, bit = (h >> 3) % warned.shape[0], 1 << (h & 7)
        if not warned[byte] & bit:
            warned[byte] |= bit
            log.warning(
                "%s: skipping %s: %s%s", self.name, path, reason, f" ({detail})" * bool(detail)
            )

    def as_dict(self) -> dict[str, int]:
        """All counts summed over processes: kept, below_min_native and every skip reason."""
        return dict(zip(_FIELDS, self._table.sum(0).tolist(), strict=True))

    def local(self) -> dict[str, int]:
        """The calling process's own counts (its row of the table)."""
        return dict(zip(_FIELDS, self._table[self._row()].tolist(), strict=True))

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
        c = self.as_dict()
        bad = ", ".join(f"{k} {v}" for k, v in self.counts.items()) or "none"
        return (
            f"{self.name}: kept {c['kept']}, below min_native {c['below_min_native']}, "
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


def _check_sizes(resolution: int, min_native: int) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
    if not isinstance(min_native, int) or min_native < 0:
        raise ValueError(f"min_native must be a number of pixels >= 0, got {min_native!r}")


def _meta(**fields: Any) -> str:
    return json.dumps(fields)


def _read_caption(data: bytes | None, json_data: bytes | None) -> tuple[str | None, str]:
    """Caption from a .txt payload, else from a .json payload's "caption".

    Returns (caption, reason): caption None with a skip reason when there is no usable caption.
    """
    caption: str | None = None
    if data is not None:
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "bad_caption"
    if not caption and json_data is not None:
        try:
            obj = json.loads(json_data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, "bad_caption"
        value = obj.get("caption") if isinstance(obj, dict) else None
        if isinstance(value, str):
            caption = value.strip()
    if caption is None:
        return None, "missing_caption"
    return (caption, "") if caption else (None, "empty_caption")


# --------------------------------------------------------------------------- folder


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
        for name in METADATA_FILES:
            if name not in files:
                continue
            meta_path = os.path.join(dirpath, name)
            found: dict[str, str | None] = {}
            try:
                _add_metadata_captions(found, dirpath, meta_path, counter)
            except UnicodeDecodeError as e:  # the whole file, not the rows read before the error
                counter.skip("bad_caption", meta_path, f"not UTF-8 text ({e}); re-save as UTF-8")
                continue
            for path, caption in found.items():
                captions.setdefault(path, caption)
    return captions


def _add_metadata_captions(
    captions: dict[str, str | None], dirpath: str, meta_path: str, counter: SkipCounter
) -> None:
    file_col = cap_col = ""
    for line_no, row in _metadata_rows(meta_path, counter):
        if not file_col:  # the first row (CSV: the header) names the columns
            file_col = _column(row, FILE_COLUMNS, meta_path)
            cap_col = _column(row, CAPTION_COLUMNS, meta_path)
        rel = row.get(file_col)
        if not isinstance(rel, str) or not rel:
            counter.skip("missing_image", f"{meta_path}:{line_no}", f"no {file_col}")
            continue
        path = os.path.normpath(os.path.join(dirpath, rel))
        value = row.get(cap_col)
        captions.setdefault(path, value if isinstance(value, str) else None)


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


def _probe(path: str) -> tuple[str, str, tuple[int, int]]:
    """Header check of one image file: (skip reason or "", detail, stored size)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty_file", "", (0, 0)
        with Image.open(path) as img:
            return "", "", img.size
    except UnidentifiedImageError:
        return "not_an_image", "Pillow cannot identify the format", (0, 0)
    except Image.DecompressionBombError as e:
        return "too_large", str(e), (0, 0)
    except Exception as e:  # any failure to read a header is bad input, never a crash
        return "corrupt_image", f"{type(e).__name__}: {e}", (0, 0)


def _read_optional(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # absent, unreadable or a directory: no sidecar
        return None


class FolderDataset(Dataset):
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
        probe_threads: int = 8,
    ):
        _check_sizes(resolution, min_native)
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder data set: {self.root} is not a directory")
        self.resolution, self.train, self.min_native = int(resolution), bool(train), int(min_native)
        self.skips = SkipCounter(f"folder {self.root}")
        self.items = self._index(probe_threads)
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

    def _index(self, threads: int) -> list[FolderItem]:
        captions = _metadata_captions(self.root, self.skips)
        paths = sorted(
            os.path.normpath(os.path.join(d, f))
            for d, _, files in os.walk(self.root)
            for f in files
            if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
        )
        on_disk = set(paths)
        for path in sorted(set(captions) - on_disk):
            self.skips.skip("missing_image", path, "listed in metadata but not found")
        with ThreadPoolExecutor(max(1, threads)) as pool:
            probes = list(pool.map(_probe, paths))
        items = []
        for path, (reason, detail, size) in zip(paths, probes, strict=True):
            if reason:
                self.skips.skip(reason, path, detail)
                continue
            stem = os.path.splitext(path)[0]
            sidecar = _read_optional(stem + ".json")  # caption and/or img2dataset's sizes
            original = _original_size(sidecar)
            if path in captions:
                caption = captions[path]
                cap_reason = "missing_caption" if caption is None else ""
                caption = (caption or "").strip()
                cap_reason = cap_reason or ("" if caption else "empty_caption")
            else:
                caption, cap_reason = _read_caption(_read_optional(stem + ".txt"), sidecar)
            if cap_reason:
                self.skips.skip(cap_reason, path)
                continue
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
        try:
            with Image.open(item.path) as img:
                size = native_size(img)
                image = prepare_image(img, self.resolution, self.train)
        except Image.DecompressionBombError as e:
            self.skips.skip("too_large", item.path, str(e))
            return None
        except Exception as e:  # decoding failures are bad input: count, warn, skip
            self.skips.skip("corrupt_image", item.path, f"{type(e).__name__}: {e}")
            return None
        rel = os.path.relpath(item.path, self.root)
        size = native_from(size, item.original)
        meta = _meta(source="folder", path=Path(rel).as_posix(), native_size=list(size))
        return {"image": image, "caption": item.caption, "key": item.key, "meta": meta}


# --------------------------------------------------------------------------- webdataset


def expand_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern (``data/{00000..00099}.tar``), a glob, a directory
    (its ``*.tar``), several of those joined by ``::`` or given as a list, or URLs
    (``pipe:``, ``http://`` … passed to webdataset unchecked). Local shards must exist."""
    specs = (
        [os.fspath(spec)] if isinstance(spec, str | os.PathLike) else [os.fspath(s) for s in spec]
    )
    urls: list[str] = []
    for s in specs:
        for u in wds.shardlists.expand_urls(s):
            if "://" in u or u.startswith("pipe:"):
                urls.append(u)
            elif os.path.isdir(u):
                urls.extend(sorted(glob.glob(os.path.join(u, "*.tar"))))
            elif any(c in u for c in "*?["):
                urls.extend(sorted(glob.glob(u)))
            else:
                urls.append(u)
    missing = [
        u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)
    ]
    if missing:
        raise FileNotFoundError(
            f"webdataset: {len(missing)} shard(s) not found, e.g. {missing[:3]} (from {spec!r})"
        )
    if not urls:
        raise FileNotFoundError(f"webdataset: {spec!r} matches no shard (expected .tar files)")
    return urls


def plan_shards(
    urls: Sequence[str], consumer: int, num_consumers: int
) -> list[tuple[str, int, int]]:
    """What consumer ``consumer`` of ``num_consumers`` (ranks × DataLoader workers) reads in an
    exact pass: a list of (url, stride, offset); it keeps sample i of that shard iff
    ``i % stride == offset``.

    The first ``S − S mod N`` shards go whole, round robin (consumer c gets shards c, c + N, …).
    Each of the ``r = S mod N`` remaining shards is shared by the consumers c ≡ j (mod r), which
    take every k-th sample of it. So every sample is read by exactly one consumer, and every
    consumer gets the same number of shards ± a fraction of one, however S and N relate
    (S < N included). The price: remainder shards are read (not decoded) by up to ⌈N/r⌉ consumers.
    """
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} out of range for {num_consumers} consumers")
    s, n = len(urls), num_consumers
    whole = s - s % n
    plan = [(urls[i], 1, 0) for i in range(consumer, whole, n)]
    r = s % n
    if r:
        j = consumer % r
        stride = len(range(j, n, r))  # consumers sharing remainder shard j: j, j + r, …
        plan.append((urls[whole + j], stride, consumer // r))
    return plan


class WebDatasetStream(IterableDataset):
    """Samples from img2dataset-style tar shards (``jpg``/``png``/``webp`` + ``txt``/``json``),
    read with the ``webdataset`` library.

    * ``resampled=False`` (an exact pass): every sample once per epoch across all ranks and
      DataLoader workers (`plan_shards`); with ``train`` the shard order (the same on every
      consumer) and a per-consumer shuffle buffer change with `set_epoch`. Ranks may yield a
      few samples more or fewer than each other: for DDP training prefer resampling.
    * ``resampled=True`` (default when training): every consumer draws shards with replacement,
      seeded by (seed, epoch, rank, worker); endless unless ``epoch_size`` is given.

    ``epoch_size`` is the number of samples per epoch over all consumers (each yields its
    share); in an exact pass it caps the pass. The caption is the ``txt`` member, else the
    ``json`` member's "caption". The native size is the stored image's, or img2dataset's
    ``original_width``/``original_height`` from the ``json`` when smaller (img2dataset may have
    upscaled); a sample whose json already says it is too small is dropped before decoding.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        resolution: int,
        train: bool = True,
        min_native: int = 0,
        *,
        resampled: bool | None = None,
        epoch_size: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        _check_sizes(resolution, min_native)
        self.urls = expand_shards(urls)
        self.resolution, self.train, self.min_native = int(resolution), bool(train), int(min_native)
        self.resampled = self.train if resampled is None else bool(resampled)
        self.epoch_size, self.shuffle_buffer, self.seed = epoch_size, int(shuffle_buffer), int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skips = SkipCounter(f"webdataset ({len(self.urls)} shards)")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (shard order, shuffle and crop seeds); call before each epoch."""
        self.epoch = int(epoch)

    def _consumer(self) -> tuple[int, int, int, int]:
        rank, world = rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return rank, worker, rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, worker, consumer, n = self._consumer()
        tag = f"{self.seed}:{self.epoch}:{consumer}"
        crop_rng = random.Random(f"crop:{tag}")
        handler = _ShardErrorHandler(self.urls, self.skips)
        guard = _StallGuard(patience=max(100, 2 * len(self.urls)), counter=self.skips)
        if self.resampled:
            resampled = wds.ResampledShards(
                self.urls,
                seed=self.seed * 1_000_003 + self.epoch,
                worker_seed=lambda: consumer,
                deterministic=True,
            )
            shards = handler.check_ends(guard.watch(iter(resampled)))
            samples = wds.tarfile_to_samples(handler=handler)(shards)
        else:
            urls = list(self.urls)
            if self.train:
                random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(urls)  # same on all
            plan = plan_shards(urls, consumer, n)
            shards = handler.check_ends(iter([{"url": u} for u, _, _ in plan]))
            raw = wds.tarfile_to_samples(handler=handler)(shards)
            samples = _take_strided(raw, {u: (k, o) for u, k, o in plan})
        if self.train and self.shuffle_buffer > 1:
            samples = wds.shuffle(
                self.shuffle_buffer,
                initial=min(100, self.shuffle_buffer),
                rng=random.Random(f"buffer:{tag}"),
            )(iter(samples))
        limit = None
        if self.epoch_size is not None:
            limit = self.epoch_size // n + (consumer < self.epoch_size % n)  # this consumer's share
        before = self.skips.local()
        for sample in samples:
            if limit is not None and guard.kept >= limit:
                break
            out = self._decode(sample, crop_rng)
            if out is not None:
                guard.kept += 1
                yield out
        after = self.skips.local()
        counts = {k: after[k] - before[k] for k in _FIELDS if after[k] != before[k]}
        log.info(
            "webdataset pass done (rank %d, worker %d, epoch %d): %s",
            rank,
            worker,
            self.epoch,
            counts or "nothing read",
        )

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        where = f"{url}:{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            self.skips.skip(
                "missing_image",
                where,
                f"members: {sorted(k for k in sample if not k.startswith('__'))}",
            )
            return None
        data, json_data = sample[ext], sample.get("json")
        if not data:
            self.skips.skip("empty_file", f"{where}.{ext}")
            return None
        caption, reason = _read_caption(sample.get("txt"), json_data)
        if reason:
            self.skips.skip(reason, where)
            return None
        original = _original_size(json_data)
        if original is not None and min(original) < self.min_native:
            self.skips.drop_small()
            return None
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            self.skips.skip("not_an_image", f"{where}.{ext}", "Pillow cannot identify the format")
            return None
        except Exception as e:  # any header failure is bad input
            self.skips.skip("corrupt_image", f"{where}.{ext}", f"{type(e).__name__}: {e}")
            return None
        with img:
            if min(img.size) < self.min_native:
                self.skips.drop_small()
                return None
            try:
                size = native_size(img)
                image = prepare_image(img, self.resolution, self.train, rng)
            except Image.DecompressionBombError as e:
                self.skips.skip("too_large", f"{where}.{ext}", str(e))
                return None
            except Exception as e:  # decoding failures are bad input: count, warn, skip
                self.skips.skip("corrupt_image", f"{where}.{ext}", f"{type(e).__name__}: {e}")
                return None
        size = native_from(size, original)
        self.skips.keep()
        return {
            "image": image,
            "caption": caption,
            "key": key,
            "meta": _meta(source="webdataset", shard=url, native_size=list(size)),
        }


def native_from(size: tuple[int, int], original: tuple[int, int] | None) -> tuple[int, int]:
    """Native size of an image stored at `size` (EXIF applied) whose source had `original`
    pixels: the original when it is smaller (the image was upscaled), turned like `size`."""
    if original is None or min(original) >= min(size):
        return size
    return original if (original[0] >= original[1]) == (size[0] >= size[1]) else original[::-1]


def _original_size(json_data: bytes | None) -> tuple[int, int] | None:
    """img2dataset's original_width/original_height, when the json has both as positive ints."""
    if json_data is None:
        return None
    try:
        obj = json.loads(json_data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    w, h = obj.get("original_width"), obj.get("original_height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    return None


def _take_strided(
    samples: Iterator[dict[str, Any]], split: dict[str, tuple[int, int]]
) -> Iterator[dict[str, Any]]:
    """Keep sample i of shard u iff i % stride == offset, with (stride, offset) = split[u]."""
    index: dict[str, int] = {}
    for sample in samples:
        url = sample.get("__url__", "")
        stride, offset = split.get(url, (1, 0))
        i = index.get(url, 0)
        index[url] = i + 1
        if i % stride == offset:
            yield sample


class _ShardErrorHandler:
    """webdataset exception handler: count the shard as broken (once per pass), warn, carry on.

    Python's tarfile ends a truncated stream silently when the cut falls in a member header, so
    `check_ends` also looks for the end-of-archive marker (two zero blocks) of local ``.tar``
    shards before they are read; the samples before a cut are still used.
    """

    def __init__(self, urls: Sequence[str], counter: SkipCounter):
        self.urls, self.counter, self.broken = set(urls), counter, set()

    def report(self, url: str, detail: str) -> None:
        if url not in self.broken:
            self.broken.add(url)
            self.counter.skip("broken_shard", url, detail)

    def __call__(self, exn: Exception) -> bool:
        url = next((a for a in exn.args if isinstance(a, str) and a in self.urls), None)
        if url is None:  # member-level errors carry the shard only inside the message
            text = " ".join(str(a) for a in exn.args)
            url = next((u for u in self.urls if u in text), "unknown shard")
        self.report(url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def check_ends(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            url = shard["url"]
            if url.endswith(".tar") and os.path.isfile(url):
                size = os.path.getsize(url)
                with open(url, "rb") as f:
                    f.seek(max(0, size - 1024))
                    tail = f.read()
                if size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
                    self.report(url, "truncated (no end-of-archive marker); reading what is there")
            yield shard


class _StallGuard:
    """Fails an endless resampled stream that reads ``patience`` shards in a row without one
    usable sample (all shards broken, or a filter nothing passes) instead of letting it spin."""

    def __init__(self, patience: int, counter: SkipCounter):
        self.patience, self.counter, self.kept = patience, counter, 0

    def watch(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        last_kept, since = -1, 0
        for shard in shards:
            if self.kept != last_kept:
                last_kept, since = self.kept, 0
            since += 1
            if since > self.patience:
                raise RuntimeError(
                    f"webdataset: no usable sample in the last {self.patience} shards read "
                    f"({self.counter.summary()}); see the warnings above"
                )
            yield shard


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
        from .scenes import ScenesDataset, ScenesStream

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
