"""`SceneCache`: a scenes data set's images drawn once at the training resolution into a uint8
array file, filled on first use and read back in later epochs and later runs (format:
docs/performance.md, "Training loop")."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from torch.utils.data import Dataset

from greedygrow.atomic import atomic_write_json
from greedygrow.data import draw, scenes, transforms
from greedygrow.data.scenes import ScenesDataset

FORMAT = "greedygrow-scene-cache/1"
FINGERPRINT_ITEMS = 4  # items drawn into the key, beside the renderer's code


def row_digest(pixels: np.ndarray) -> int:
    """A row's check value: 64 bits of BLAKE2b of its bytes, odd (0 marks a row not drawn)."""
    digest = hashlib.blake2b(np.ascontiguousarray(pixels), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) | 1


class SceneCache(Dataset):
    """`dataset`'s items as {"image": uint8 [3, R, R]} (and "caption" if `captions`), the
    pixels read from `directory/<key>/images.u8` when drawn before, else drawn and stored there.
    The key covers the data set's parameters, the renderer's code and library versions, and
    its first drawings; every row's digest is checked on every read, and a row that fails is
    drawn again, never returned."""

    def __init__(
        self, dataset: ScenesDataset, directory: str | os.PathLike, captions: bool = True
    ) -> None:
        self.dataset, self.captions = dataset, captions
        r = dataset.resolution
        self.shape = (len(dataset), 3, r, r)
        fingerprint = hashlib.sha256(f"numpy {np.__version__} Pillow {PIL.__version__}".encode())
        for module in (draw, scenes, transforms):  # the renderer's code
            fingerprint.update(Path(module.__file__).read_bytes())
        for i in range(min(FINGERPRINT_ITEMS, len(dataset))):
            fingerprint.update(dataset.pixels(i).tobytes() + dataset.caption(i).encode())
        self.meta = {
            "format": FORMAT,
            "seed": int(dataset.seed),
            "resolution": r,
            "count": int(dataset.total),
            "min_native": int(dataset.min_native),
            "items": len(dataset),
            "fingerprint": fingerprint.hexdigest(),
        }
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(directory) / f"scenes-{r}px-{key}"
        self._images: np.ndarray | None = None
        self._digests: np.ndarray | None = None
        self._open()

    @staticmethod
    def nbytes(dataset: ScenesDataset) -> int:
        """Bytes a cache of `dataset` takes on disk once every row is drawn."""
        return len(dataset) * (3 * dataset.resolution**2 + 8)

    def _open(self) -> None:
        """Map the two arrays, creating (or, if the wrong size, replacing) them first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        n = self.shape[0]
        files = {"images.u8": (np.uint8, self.shape), "digests.i64": (np.int64, (n,))}
        maps = []
        for name, (dtype, shape) in files.items():
            path, size = self.folder / name, int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != size:
                _create_sparse(path, size)
            maps.append(np.memmap(path, dtype=dtype, mode="r+", shape=shape))
        self._images, self._digests = maps
        if not (self.folder / "meta.json").is_file():
            atomic_write_json(self.folder / "meta.json", self.meta)

    def __getstate__(self) -> dict[str, Any]:  # a spawned DataLoader worker maps the files anew
        return {**self.__dict__, "_images": None, "_digests": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._images is None:
            self._open()
        pixels = np.array(self._images[i])
        if row_digest(pixels) != self._digests[i]:  # not drawn yet, or damaged
            pixels = self.dataset.pixels(i)
            self._images[i] = pixels
            self._digests[i] = row_digest(pixels)  # after the row: a torn write reads as damaged
        item: dict[str, Any] = {"image": torch.from_numpy(pixels)}
        if self.captions:
            item["caption"] = self.dataset.caption(i)
        return item


def _create_sparse(path: Path, size: int) -> None:
    """Put a zero-filled (sparse) file of `size` bytes at `path`, atomically: a file that is
    there with the right size is kept (another process made it), one with a wrong size replaced."""
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        os.link(tmp, path)  # fails if the file exists
    except FileExistsError:
        if path.stat().st_size != size:
            warnings.warn(
                f"scene cache: {path} has the wrong size; replacing it (its rows are drawn again)",
                stacklevel=4,
            )
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
