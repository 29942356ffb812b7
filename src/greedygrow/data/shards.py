"""img2dataset-style WebDataset tar shards (`WebDatasetStream`), read with ``webdataset``.

The stream simply does not yield bad samples (counted as `greedygrow.data.skips` describes),
and logs its counts when a finite pass ends. Exact passes split the shards across ranks ×
DataLoader workers so every sample is read exactly once (see `plan_shards`); training streams
resample shards.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from greedygrow.data.skips import (
    IMAGE_EXTENSIONS,
    ImageReader,
    SkipCounter,
    log,
    native_from,
    original_size,
    parse_json,
    read_caption,
)
from greedygrow.data.split import consumer


def _is_url(u: str) -> bool:
    return "://" in u or u.startswith("pipe:")


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
            if _is_url(u):
                urls.append(u)
            elif os.path.isdir(u):
                urls.extend(sorted(glob.glob(os.path.join(u, "*.tar"))))
            elif any(c in u for c in "*?["):
                urls.extend(sorted(glob.glob(u)))
            else:
                urls.append(u)
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
    """What consumer ``consumer`` of ``num_consumers`` (ranks × DataLoader workers) reads in an
    exact pass: a list of (url, stride, offset); it keeps sample i of that shard iff
    ``i % stride == offset``.

    The first ``S − S mod N`` shards go whole, round robin (consumer c gets shards c, c + N, …).
    Each of the ``r = S mod N`` remaining shards is shared by the consumers c ≡ j (mod r), which
    take every k-th sample of it. So every sample is read by exactly one consumer, and every
    consumer gets the same number of shards ± a fraction of one, however S and N relate
    (S < N included). The price: remainder shards are read (not decoded) by up to ⌈N/r⌉ consumers.
    """
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
        crop_rng = random.Random(f"crop:{tag}")
        samples = self._samples(me, n)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.shuffle(
                self.shuffle_buffer,
                initial=min(100, self.shuffle_buffer),
                rng=random.Random(f"buffer:{tag}"),
            )(iter(samples))
        limit = None
        if self.epoch_size is not None:
            limit = self.epoch_size // n + (me < self.epoch_size % n)  # this consumer's share
        before = self.skips.local()
        kept = 0
        for sample in samples:
            if limit is not None and kept >= limit:
                break
            out = self._decode(sample, crop_rng)
            if out is not None:
                kept += 1
                yield out
        after = self.skips.local()
        counts = {k: v - before[k] for k, v in after.items() if v != before[k]}
        log.info(
            "webdataset pass done (consumer %d of %d, epoch %d): %s",
            me,
            n,
            self.epoch,
            counts or "nothing read",
        )

    def _samples(self, me: int, n: int) -> Iterator[dict[str, Any]]:
        """Raw tar samples of consumer `me` of `n`: resampled shards, or its exact-pass share."""
        handler = _ShardErrorHandler(self.urls, self.skips)
        read = wds.tarfile_to_samples(handler=handler)
        if self.resampled:
            shards = wds.ResampledShards(
                self.urls,
                seed=self.seed * 1_000_003 + self.epoch,
                worker_seed=lambda: me,
                deterministic=True,
            )
            patience = max(100, 2 * len(self.urls))
            return read(handler.check_ends(_fail_when_stalled(iter(shards), self.skips, patience)))
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
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            self.skips.skip("missing_image", where, f"members: {members}")
            return None
        if not sample[ext]:
            self.skips.skip("empty_file", f"{where}.{ext}")
            return None
        meta = parse_json(sample.get("json"))
        caption, reason = read_caption(sample.get("txt"), meta)
        if reason:
            self.skips.skip(reason, where)
            return None
        original = original_size(meta)
        if original is not None and min(original) < self.min_native:
            self.skips.drop_small()
            return None
        loaded = self._load(io.BytesIO(sample[ext]), f"{where}.{ext}", rng)
        if loaded is None:
            return None
        image, size = loaded
        self.skips.keep()
        native = list(native_from(size, original))
        meta = json.dumps({"source": "webdataset", "shard": url, "native_size": native})
        return {"image": image, "caption": caption, "key": key, "meta": meta}


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


def _fail_when_stalled(
    shards: Iterator[dict[str, Any]], counter: SkipCounter, patience: int
) -> Iterator[dict[str, Any]]:
    """Fail an endless resampled stream that reads `patience` shards in a row without one
    usable sample (all shards broken, or a filter nothing passes) instead of letting it spin."""
    last_kept, since = -1, 0
    for shard in shards:
        kept = counter.local()["kept"]
        if kept != last_kept:
            last_kept, since = kept, 0
        since += 1
        if since > patience:
            raise RuntimeError(
                f"webdataset: no usable sample in the last {patience} shards read "
                f"({counter.summary()}); see the warnings above"
            )
        yield shard
