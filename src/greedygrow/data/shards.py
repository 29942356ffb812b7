"""img2dataset-style tar shards (`WebDatasetStream`), read with ``webdataset``."""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from greedygrow.data.sources import (
    IMAGE_EXTENSIONS,
    ImageReader,
    SkipCounter,
    log,
    original_size,
    parse_json,
    read_caption,
)
from greedygrow.data.split import consumer


def _is_url(u: str) -> bool:
    return "://" in u or u.startswith("pipe:")


def expand_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shards from patterns, globs, directories and URLs (docs/data.md); local ones must exist."""
    urls: list[str] = []
    for s in [spec] if isinstance(spec, str | os.PathLike) else spec:
        for u in wds.shardlists.expand_urls(os.fspath(s)):
            if not _is_url(u) and os.path.isdir(u):
                u = os.path.join(u, "*.tar")
            urls += sorted(glob.glob(u)) or [u]  # a URL, or a path that is checked below
    missing = [u for u in urls if not _is_url(u) and not os.path.isfile(u)]
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
    """An exact pass's share as (url, stride, offset): keep sample i iff i % stride == offset."""
    s, n = len(urls), num_consumers
    whole = s - s % n
    plan = [(urls[i], 1, 0) for i in range(consumer, whole, n)]
    r = s % n
    if r:
        j = consumer % r
        stride = len(range(j, n, r))  # consumers sharing remainder shard j: j, j + r, …
        plan.append((urls[whole + j], stride, consumer // r))
    return plan


class WebDatasetStream(ImageReader, IterableDataset):
    """Samples from tar shards: an exact pass, or shards drawn with replacement (docs/data.md)."""

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
        self.urls = expand_shards(urls)
        self._setup(resolution, train, min_native, f"webdataset ({len(self.urls)} shards)")
        self.resampled = self.train if resampled is None else bool(resampled)
        self.epoch_size, self.shuffle_buffer, self.seed = epoch_size, int(shuffle_buffer), int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (shard order, shuffle and crop seeds); call before each epoch."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, n = consumer(self.rank, self.world_size)
        tag = f"{self.seed}:{self.epoch}:{me}"
        samples = self._samples(me, n)
        if self.train and self.shuffle_buffer > 1:
            buffer, rng = self.shuffle_buffer, random.Random(f"buffer:{tag}")
            samples = wds.shuffle(buffer, initial=min(100, buffer), rng=rng)(iter(samples))
        limit = None
        if self.epoch_size is not None:
            limit = self.epoch_size // n + (me < self.epoch_size % n)  # this consumer's share
        crop_rng = random.Random(f"crop:{tag}")
        decoded = (self._decode(sample, crop_rng) for sample in samples)
        yield from itertools.islice((item for item in decoded if item is not None), limit)
        log.info("webdataset pass done (consumer %d of %d): %s", me, n, self.skips.summary())

    def _samples(self, me: int, n: int) -> Iterator[dict[str, Any]]:
        """Raw tar samples of consumer `me` of `n`: resampled shards, or its exact-pass share."""
        handler = _ShardErrorHandler(self.urls, self.skips)
        read = wds.tarfile_to_samples(handler=handler)
        if self.resampled:
            seed = self.seed * 1_000_003 + self.epoch
            shards = wds.ResampledShards(
                self.urls, seed=seed, worker_seed=lambda: me, deterministic=True
            )
            return read(handler.check_ends(iter(shards), patience=max(100, 2 * len(self.urls))))
        urls = list(self.urls)
        if self.train:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(urls)  # same on all
        plan = plan_shards(urls, me, n)
        raw = read(handler.check_ends(iter([{"url": u} for u, _, _ in plan])))
        return _take_strided(raw, {u: (k, o) for u, k, o in plan})

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        where = f"{url}:{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        meta = parse_json(sample.get("json"))
        caption, reason = read_caption(sample.get("txt"), meta)
        if ext is None:
            reason = "missing_image"
        elif not sample[ext]:
            reason = "empty_file"
        if reason:
            self.skips.skip(reason, where)
            return None
        loaded = self._load(io.BytesIO(sample[ext]), f"{where}.{ext}", original_size(meta), rng)
        if loaded is None:
            return None
        self.skips.keep()
        meta = json.dumps({"source": "webdataset", "shard": url, "native_size": loaded[1]})
        return {"image": loaded[0], "caption": caption, "key": key, "meta": meta}


def _take_strided(
    samples: Iterator[dict[str, Any]], split: dict[str, tuple[int, int]]
) -> Iterator[dict[str, Any]]:
    """Keep sample i of shard u iff i % stride == offset, with (stride, offset) = split[u]."""
    for url, shard in itertools.groupby(samples, key=lambda sample: sample["__url__"]):
        yield from itertools.islice(shard, split[url][1], None, split[url][0])


class _ShardErrorHandler:
    """webdataset exception handler: count a shard as broken once per pass, warn, carry on."""

    def __init__(self, urls: Sequence[str], counter: SkipCounter):
        self.urls, self.counter, self.broken = set(urls), counter, set()

    def report(self, url: str, detail: str) -> None:
        if url not in self.broken:
            self.broken.add(url)
            self.counter.skip("broken_shard", url, detail)

    def __call__(self, exn: Exception) -> bool:
        text = " ".join(str(a) for a in exn.args)  # the shard is an argument, or inside one
        url = max((u for u in self.urls if u in text), key=len, default="unknown shard")
        self.report(url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def check_ends(
        self, shards: Iterator[dict[str, Any]], patience: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Report truncated local shards; fail after `patience` shards without a usable sample."""
        for read, shard in enumerate(shards):
            if patience is not None and read >= patience and not self.counter.kept:
                raise RuntimeError(
                    f"webdataset: no usable sample in the {patience} shards read "
                    f"({self.counter.summary()}); see the warnings above"
                )
            url = shard["url"]
            if url.endswith(".tar") and os.path.isfile(url):
                with open(url, "rb") as f:  # a whole tar ends in two zero blocks (and padding)
                    f.seek(max(0, os.path.getsize(url) - 1024))
                    if f.read() != bytes(1024):
                        self.report(url, "truncated (no end-of-archive marker); read up to the cut")
            yield shard
