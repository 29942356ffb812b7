"""Data sets: built-in scenes and real text–image readers, items as docs/data.md describes."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset

from greedygrow.data.mixture import Mixture
from greedygrow.data.scenes import ScenesDataset, ScenesStream, sample_scene, write_dataset
from greedygrow.data.shards import WebDatasetStream
from greedygrow.data.sources import FolderDataset, SkipCounter, skip_none_collate


def make_dataset(
    source: str,
    path: str | os.PathLike | Sequence[str] | None,
    resolution: int,
    train: bool = True,
    min_native: int = 0,
    seed: int = 0,
    count: int | None = None,
) -> Dataset | IterableDataset:
    """The data set of ``source``: scenes, folder or webdataset (``count``: docs/data.md)."""
    if source == "scenes":
        if path not in (None, ""):
            raise ValueError(
                f"scenes are generated and take no path (got {path!r}); to read scenes written "
                f"with `greedygrow scenes`, use source 'folder' or 'webdataset'"
            )
        if count is not None:
            return ScenesDataset(count, resolution, seed, min_native)
        return ScenesStream(resolution, seed, min_native)
    if path in (None, ""):
        raise ValueError(f"data source {source!r} needs a path")
    if source == "folder":
        return FolderDataset(path, resolution, train, min_native, count=count, seed=seed)
    if source == "webdataset":
        return WebDatasetStream(path, resolution, train, min_native, epoch_size=count, seed=seed)
    raise ValueError(f"unknown data source {source!r}; expected 'scenes', 'folder' or 'webdataset'")


def make_mixture(
    entries: Sequence[dict[str, Any]],
    resolution: int,
    train: bool = True,
    min_native: int = 0,
    seed: int = 0,
) -> Mixture:
    """A `Mixture` of `entries`, each ``{source: scenes|folder, path, count, weight (default
    1)}`` built as `make_dataset` builds it, `min_native` for all (docs/data.md, Mixtures)."""
    sources = []
    for k, e in enumerate(entries):
        if e.get("source") not in ("scenes", "folder") or (
            e["source"] == "scenes" and e.get("count") is None
        ):
            raise ValueError(
                f"mixture entry {k} {e}: a mixture draws items by index, so it takes scenes with "
                "a count or a folder, not a stream (scenes without count, webdataset)"
            )
        d = make_dataset(
            e["source"], e.get("path"), resolution, train, min_native, seed, e.get("count")
        )
        sources.append(d)
    return Mixture(sources, [e.get("weight", 1.0) for e in entries], seed)


def captions(spec: str, seed: int = 0, workers: int = 0) -> Iterator[str]:
    """The captions of an encode-text `--data` spec, decoding no image where they are known."""
    source, _, rest = spec.partition(":")
    if source == "scenes":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"--data {spec!r}: scenes need a count, e.g. scenes:10000")
        indices = ScenesDataset(int(rest), 32, seed).indices  # checks the seed now, not lazily
        return (sample_scene(seed, int(i)).caption for i in indices)
    if source not in ("folder", "webdataset") or not rest:
        tars = ".tar" in spec or glob.glob(os.path.join(spec, "*.tar"))
        source, rest = ("webdataset" if tars else "folder"), spec
        if not tars and not os.path.isdir(spec):
            raise ValueError(
                f"--data {spec!r} is neither scenes:COUNT, a folder, nor webdataset shards "
                "(a .tar pattern such as data/{00000..00009}.tar)"
            )
    dataset = make_dataset(source, rest, 32, train=False, seed=seed)
    if source == "folder":  # captions were read while indexing
        return (item.caption for item in dataset.items)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return (item["caption"] for item in loader if item is not None)
