"""`CachedTextEncoder`: a text encoder whose caption embeddings are kept on disk.

Each encoder has its own folder of immutable safetensors shards. A shard holds `tokens`
[ΣL, E] float32 (each caption's L real token vectors, packed), `offsets` [N+1] int64,
`pooled` [N, E] float32, `crc` [N] int64 (CRC-32 of each entry) and, in its metadata, the
format, the encoder id and the N caption keys. A shard is written once with
`greedygrow.atomic` and never changed, so readers need no locks; names carry time, pid and a
random part, so processes sharing a folder (torchrun ranks, workers) never collide.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
import weakref
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from greedygrow.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from greedygrow.text import TextEmbeddings

FORMAT = "greedygrow-text-cache/1"
Entry = tuple[Tensor, Tensor]  # one caption: real tokens [L, E], pooled [E]


class TextEncoderLike(Protocol):
    """What `CachedTextEncoder` (and the trainer) needs from an encoder, e.g. a `TextEncoder`."""

    id: str
    dim: int
    max_length: int
    device: torch.device

    def encode(self, captions: Sequence[str]) -> TextEmbeddings: ...


def caption_key(caption: str) -> str:
    """Cache key of a caption: the first 128 bits of SHA-256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def cache_subdir(encoder_id: str) -> str:
    """Folder name of an encoder's shards inside a cache directory."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in encoder_id)
    return f"{safe[:80]}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:8]}"


class CachedTextEncoder:
    """`encoder` with its embeddings cached on disk under `cache_dir/<encoder id>/`.

    Looks each caption up (by `caption_key`), encodes only the misses (each distinct caption
    once, in the encoder's batches) and stores them; new entries are buffered and written as
    a shard every `shard_size` entries, on `flush()`, on leaving a `with` block and at exit.
    The index (key → shard, row) comes from shard headers; a miss lists the folder again, so
    shards of other processes are picked up (duplicates are harmless: the oldest shard wins).
    A shard that cannot be read, or whose entry fails its checksum, is reported with a
    warning, renamed to *.bad and forgotten, and its captions are encoded again; a shard of
    another encoder is skipped with a warning. Returns exactly the tensors the encoder
    produced, on the encoder's device.
    """

    def __init__(
        self, encoder: TextEncoderLike, cache_dir: str | os.PathLike, *, shard_size: int = 1024
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"CachedTextEncoder: shard_size must be >= 1, got {shard_size}")
        self.encoder, self.shard_size = encoder, shard_size
        self.id, self.dim, self.max_length = encoder.id, encoder.dim, encoder.max_length
        self.directory = Path(cache_dir) / cache_subdir(encoder.id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                f"CachedTextEncoder: cannot create cache directory {self.directory} ({e}); "
                "pass a writable --cache / cache_dir"
            ) from e
        self.hits = self.misses = 0
        self._pending: dict[str, Entry] = {}  # encoded, not yet written
        self._index: dict[str, tuple[Path, int]] = {}
        self._seen: set[str] = set()  # shard names already indexed (or skipped)
        weakref.finalize(self, _write_shard, self.directory, self.id, self._pending)
        self._refresh()

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def __repr__(self) -> str:
        return f"CachedTextEncoder({self.encoder!r}, {str(self.directory)!r})"

    def __enter__(self) -> CachedTextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def __len__(self) -> int:
        """Number of cached captions (written or buffered)."""
        return len(self._index) + sum(k not in self._index for k in self._pending)

    def flush(self) -> None:
        """Write buffered entries to disk now, as one new shard."""
        _write_shard(self.directory, self.id, self._pending)
        self._refresh()

    def size_bytes(self) -> int:
        """Bytes of shard files on disk for this encoder."""
        return sum(p.stat().st_size for p in self.directory.glob("shard-*.safetensors"))

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embed `captions` like the wrapped encoder, reading and filling the cache."""
        from greedygrow.text import TextEmbeddings, check_captions  # text.py re-exports us

        captions = check_captions(captions)
        keys = [caption_key(c) for c in captions]
        unique = list(dict.fromkeys(keys))
        entries = self._get(unique)
        missing = [k for k in unique if k not in entries]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            first = dict(zip(keys, captions, strict=True))
            fresh = self.encoder.encode([first[k] for k in missing]).to("cpu")
            for i, key in enumerate(missing):
                entries[key] = self._pending[key] = self._entry(fresh, i)
                if len(self._pending) >= self.shard_size:
                    self.flush()
        n, length, dim = len(captions), self.max_length, self.dim
        out = TextEmbeddings(
            torch.zeros(n, length, dim),
            torch.zeros(n, length, dtype=torch.bool),
            torch.zeros(n, dim),
        )
        for i, key in enumerate(keys):
            tokens, pooled = entries[key]
            out.tokens[i, : len(tokens)] = tokens
            out.mask[i, : len(tokens)] = True
            out.pooled[i] = pooled
        return out.to(self.device)

    def _entry(self, fresh: TextEmbeddings, i: int) -> Entry:
        real = int(fresh.mask[i].sum())
        if real < 1 or not bool(fresh.mask[i, :real].all()):
            raise ValueError(
                f"CachedTextEncoder: encoder {self.id} returned a mask that is not a non-empty "
                "prefix (padding must be on the right); it cannot be cached"
            )
        return fresh.tokens[i, :real].float().clone(), fresh.pooled[i].float().clone()

    def _get(self, keys: list[str]) -> dict[str, Entry]:
        """Entries of the keys that are cached, buffered or on disk."""
        found = {k: self._pending[k] for k in keys if k in self._pending}
        if any(k not in self._index for k in keys if k not in found):
            self._refresh()
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for key in keys:
            if key not in found and key in self._index:
                path, row = self._index[key]
                by_shard.setdefault(path, []).append((key, row))
        for path, rows in by_shard.items():
            self._read(path, rows, found)
        return found

    def _read(self, path: Path, rows: list[tuple[str, int]], found: dict[str, Entry]) -> None:
        """Read `rows` of one shard into `found` (those before a damaged entry, if any)."""
        try:
            with safe_open(str(path), "np") as f:  # numpy slices are ~3x faster than "pt" ones
                offsets, crc = f.get_tensor("offsets"), f.get_tensor("crc")
                tokens, pooled = f.get_slice("tokens"), f.get_slice("pooled")
                for key, row in rows:
                    tok = tokens[int(offsets[row]) : int(offsets[row + 1])]
                    vec = pooled[row : row + 1][0]
                    if _crc(tok, vec) != int(crc[row]):
                        return self._quarantine(path, f"checksum mismatch at entry {row}")
                    found[key] = torch.from_numpy(tok), torch.from_numpy(vec)
        except Exception as e:  # deleted or damaged since it was indexed
            self._quarantine(path, f"unreadable: {type(e).__name__}: {e}")
        return None

    def _refresh(self) -> None:
        """Index the shard files not seen before (written by us or by another process)."""
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            try:
                with safe_open(str(path), "np") as f:  # checks the header and file size
                    meta = f.metadata() or {}
                keys = json.loads(meta["keys"])
            except FileNotFoundError:
                continue  # removed since the listing
            except Exception as e:  # safetensors, JSON or key errors
                self._quarantine(path, f"unreadable: {type(e).__name__}: {e}")
                continue
            if meta.get("format") != FORMAT or meta.get("encoder") != self.id:
                warnings.warn(
                    f"text embedding cache: skipping shard {path}: it is {meta.get('format')} "
                    f"by {meta.get('encoder')}, not {FORMAT} by {self.id}",
                    stacklevel=4,
                )
            else:
                for row, key in enumerate(keys):
                    self._index.setdefault(key, (path, row))

    def _quarantine(self, path: Path, reason: str) -> None:
        """Warn, forget the shard's entries and rename it to *.bad so no process reads it again."""
        warnings.warn(
            f"text embedding cache: ignoring shard {path} ({reason}); its captions will be "
            "re-encoded. The file is renamed to *.bad",
            stacklevel=5,
        )
        self._index = {k: v for k, v in self._index.items() if v[0] != path}
        with contextlib.suppress(OSError):  # read-only cache, or another process did it
            os.replace(path, path.with_name(path.name + ".bad"))


def _crc(tokens: np.ndarray, pooled: np.ndarray) -> int:
    """CRC-32 of an entry's float32 bytes (tokens, then pooled)."""
    return zlib.crc32(np.ascontiguousarray(pooled), zlib.crc32(np.ascontiguousarray(tokens)))


def _write_shard(directory: Path, encoder_id: str, pending: dict[str, Entry]) -> None:
    """Write and clear `pending` as one new shard (a warning, not an error, if that fails)."""
    keys, entries = list(pending), dict(pending)
    pending.clear()
    if not keys:
        return
    tokens = [entries[k][0] for k in keys]
    pooled = torch.stack([entries[k][1] for k in keys])
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    crc = [_crc(t.numpy(), p.numpy()) for t, p in zip(tokens, pooled, strict=True)]
    tensors = {
        "tokens": torch.cat(tokens),
        "pooled": pooled,
        "offsets": torch.from_numpy(offsets).to(torch.int64),
        "crc": torch.tensor(crc, dtype=torch.int64),
    }
    meta = {"format": FORMAT, "encoder": encoder_id, "keys": json.dumps(keys)}
    path = (
        directory / f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    )
    try:
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as e:
        warnings.warn(
            f"text embedding cache: could not write {path} ({e}); "
            f"{len(keys)} embeddings stay uncached",
            stacklevel=3,
        )
