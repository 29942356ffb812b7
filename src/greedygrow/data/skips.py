"""Bad input in real data: what is skipped and why, counted once, and the reads that decide it.

Bad input never crashes and never becomes a default image. A zero-byte file, a file that is
not an image, a truncated or corrupt image, a missing or empty caption, a broken tar shard:
each is skipped, counted by reason in a `SkipCounter` and warned about once per path (logger
``greedygrow.data``). Images whose native shorter side is below ``min_native`` (the paper's
high-resolution subset) are dropped and counted, without a warning. Counts from DataLoader
workers land in shared memory, so ``dataset.skips`` in the main process is up to date.
Counters are per rank; reduce ``skips.as_dict()`` across ranks if you want totals.

Both readers (`sources.FolderDataset`, `shards.WebDatasetStream`) are `ImageReader`s and yield
the item dicts of docs/data.md: ``{"image": FloatTensor[3, R, R] in [−1, 1], "caption": str,
"key": str, "meta": JSON str}`` (transforms in `greedygrow.data.transforms`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate, get_worker_info

from greedygrow.data.transforms import native_size, prepare_image

log = logging.getLogger("greedygrow.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

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
_MAX_WORKERS = 64  # DataLoader workers with a row of their own (more share rows)
_WARN_TABLE_BYTES = 1 << 20  # 8 Mi bits of hashed warned-about paths
BROKEN = object()  # a .json payload that does not parse


class SkipCounter:
    """Kept, dropped (below ``min_native``) and skipped (bad input, by reason) sample counts.

    The counts live in a shared-memory table with one row per process (row 0: the process that
    made the counter, row 1 + w: DataLoader worker w), so DataLoader workers need no locks and
    the main process sees their counts. Warnings are issued once per path across workers and
    epochs, through a shared table of hashed paths (a hash collision can suppress a warning,
    never a count).
    """

    def __init__(self, name: str = "data"):
        self.name = name
        self._table = torch.zeros(1 + _MAX_WORKERS, len(_FIELDS), dtype=torch.int64)
        self._table.share_memory_()
        self._warned = torch.zeros(_WARN_TABLE_BYTES, dtype=torch.uint8).share_memory_()

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % _MAX_WORKERS

    def _add(self, field: str, n: int = 1) -> None:
        self._table.numpy()[self._row(), _FIELDS.index(field)] += n

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
        h = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")
        byte, bit = (h >> 3) % warned.shape[0], 1 << (h & 7)
        if not warned[byte] & bit:
            warned[byte] |= bit
            log.warning(
                "%s: skipping %s: %s%s", self.name, path, reason, f" ({detail})" * bool(detail)
            )

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


class ImageReader:
    """What both real-data readers share: their sizes, a `SkipCounter`, and loading an image."""

    def _setup(self, resolution: int, train: bool, min_native: int, name: str) -> None:
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
        if not isinstance(min_native, int) or min_native < 0:
            raise ValueError(f"min_native must be a number of pixels >= 0, got {min_native!r}")
        self.resolution, self.train, self.min_native = int(resolution), bool(train), int(min_native)
        self.skips = SkipCounter(name)

    def _load(
        self, file: str | io.BytesIO, where: str, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(image tensor, native size) of an image file, or None if it is bad (skipped and
        warned about) or its stored shorter side is below `min_native` (dropped)."""
        try:
            with Image.open(file) as img:
                if min(img.size) < self.min_native:
                    self.skips.drop_small()
                    return None
                size = native_size(img)  # before prepare_image: it may decode at reduced scale
                return prepare_image(img, self.resolution, self.train, rng), size
        except Exception as e:  # any failure to read the image is bad input: count, warn, skip
            self.skips.skip_image(where, e)
            return None


def parse_json(data: bytes | None) -> Any:
    """A .json payload parsed; None when absent, `BROKEN` when not UTF-8 JSON."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return BROKEN


def clean_caption(caption: str | None) -> tuple[str | None, str]:
    """(stripped caption, "") or (None, skip reason) for an absent or empty one."""
    if caption is None:
        return None, "missing_caption"
    caption = caption.strip()
    return (caption, "") if caption else (None, "empty_caption")


def read_caption(txt: bytes | None, meta: Any) -> tuple[str | None, str]:
    """Caption from a .txt payload, else from the parsed .json's "caption" (see `clean_caption`)."""
    caption = None
    if txt is not None:
        try:
            caption = txt.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "bad_caption"
    if not caption and meta is BROKEN:
        return None, "bad_caption"
    if not caption and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    return clean_caption(caption)


def original_size(meta: Any) -> tuple[int, int] | None:
    """img2dataset's original_width/original_height, when the json has both as positive ints."""
    if not isinstance(meta, dict):
        return None
    w, h = meta.get("original_width"), meta.get("original_height")
    return (w, h) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else None


def native_from(size: tuple[int, int], original: tuple[int, int] | None) -> tuple[int, int]:
    """Native size of an image stored at `size` (EXIF applied) whose source had `original`
    pixels: the original when it is smaller (the image was upscaled), turned like `size`."""
    if original is None or min(original) >= min(size):
        return size
    return original if (original[0] >= original[1]) == (size[0] >= size[1]) else original[::-1]
