"""`CachedTextEncoder`: a text encoder whose caption embeddings are kept on disk, one folder
per encoder, in immutable safetensors shards (format: docs/performance.md, "Text encoding");
`TextTable`: a fixed list of captions' embeddings on the training device, gathered by row."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save
from torch import Tensor

from greedygrow.atomic import atomic_write_bytes
from greedygrow.text import TextEmbeddings, TextEncoder, check_captions

FORMAT = "greedygrow-text-cache/2"
ARRAYS = ("tokens", "offsets", "pooled")
Entry = tuple[Tensor, Tensor]  # one caption: real tokens [L, E], pooled [E]


def caption_key(caption: str) -> str:
    """Cache key of a caption: the first 128 bits of SHA-256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(caption.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class CachedTextEncoder:
    """`encoder` (a `TextEncoder`, or any object with its id, dim, max_length, device and
    encode) with its embeddings cached under `cache_dir/<encoder id>/`: misses are encoded
    once and written as a shard every `shard_size` entries, on `flush()`, `with` exit, at exit."""

    def __init__(
        self, encoder: TextEncoder, cache_dir: str | os.PathLike, *, shard_size: int = 1024
    ) -> None:
        self.encoder, self.shard_size = encoder, shard_size
        self.id, self.dim, self.max_length = encoder.id, encoder.dim, encoder.max_length
        self.device = encoder.device
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in encoder.id)[:80]
        digest = hashlib.sha256(f"{FORMAT} {encoder.id}".encode()).hexdigest()[:8]
        self.directory = Path(cache_dir) / f"{safe}-{digest}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self._pending: dict[str, Entry] = {}  # encoded, not yet written
        self._index: dict[str, tuple[Path, int]] = {}  # key → (shard, row)
        self._shards: dict[Path, bool] = {}  # shards indexed or skipped: checksum verified?
        weakref.finalize(self, _write_shard, self.directory, self.id, self._pending)
        self._refresh()

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
        """Embed `captions` like the wrapped encoder (the same tensors), through the cache."""
        keys, entries = self._entries(check_captions(captions))
        n, length, dim = len(keys), self.max_length, self.dim
        pin = torch.device(self.device).type == "cuda"  # pinned: the copy does not block
        out = TextEmbeddings(
            torch.zeros(n, length, dim, pin_memory=pin),
            torch.zeros(n, length, dtype=torch.bool, pin_memory=pin),
            torch.zeros(n, dim, pin_memory=pin),
        )
        for i, key in enumerate(keys):
            tokens, pooled = entries[key]
            out.tokens[i, : len(tokens)] = tokens
            out.pooled[i] = pooled
            out.mask[i, : len(tokens)] = True
        return out.to(self.device, non_blocking=pin)

    def table(
        self, captions: Sequence[str], device: torch.device | str, max_bytes: int
    ) -> TextTable | None:
        """A `TextTable` of `captions` on `device` (row i: caption i), built through the cache;
        None, with the cache filled so far, once it would take more than `max_bytes`."""
        keys = [caption_key(c) for c in check_captions(captions)]
        unique = list(dict.fromkeys(keys))
        rows = {key: row for row, key in enumerate(unique)}
        text = dict(zip(keys, captions, strict=True))
        tokens, pooled, lengths, size = [], [], [], 8 * len(keys)
        for chunk in range(0, len(unique), self.shard_size):
            part = unique[chunk : chunk + self.shard_size]
            _, entries = self._entries([text[k] for k in part])
            size += sum(4 * (e[0].numel() + e[1].numel()) + 16 for e in entries.values())
            if size > max_bytes:
                return None
            tokens.append(torch.cat([entries[k][0] for k in part]))
            pooled.append(torch.stack([entries[k][1] for k in part]))
            lengths += [len(entries[k][0]) for k in part]
        tokens.append(torch.zeros(1, self.dim))  # the padding row
        return TextTable(
            torch.cat(tokens),
            torch.tensor(lengths, dtype=torch.long),
            torch.cat(pooled) if pooled else torch.zeros(0, self.dim),
            torch.tensor([rows[k] for k in keys], dtype=torch.long),
            self.max_length,
            device,
        )

    def _entries(self, captions: list[str]) -> tuple[list[str], dict[str, Entry]]:
        """The captions' keys and the entry of each key: from the cache, else encoded."""
        keys = [caption_key(c) for c in captions]
        unique = dict(zip(keys, captions, strict=True))
        entries = self._get(list(unique))
        missing = [k for k in unique if k not in entries]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.encoder.encode([unique[k] for k in missing]).to("cpu")
            for i, key in enumerate(missing):
                real = int(fresh.mask[i].sum())
                entry = fresh.tokens[i, :real].clone(), fresh.pooled[i].clone()
                entries[key] = self._pending[key] = entry
                if len(self._pending) >= self.shard_size:
                    self.flush()
        return keys, entries

    def _get(self, keys: list[str]) -> dict[str, Entry]:
        """Entries of the keys that are buffered or on disk."""
        found = {k: self._pending[k] for k in keys if k in self._pending}
        if any(k not in self._index for k in keys if k not in found):
            self._refresh()
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for key in keys:
            if key not in found and key in self._index:
                path, row = self._index[key]
                by_shard.setdefault(path, []).append((key, row))
        for path, rows in by_shard.items():
            try:
                with safe_open(str(path), "np") as f:  # numpy slices: ~3x faster than "pt"
                    if not self._shards[path]:
                        if _digest(f.get_tensor(n) for n in ARRAYS) != f.metadata()["sha256"]:
                            raise ValueError("checksum mismatch")
                        self._shards[path] = True
                    offsets = f.get_tensor("offsets")
                    tokens, pooled = f.get_slice("tokens"), f.get_slice("pooled")
                    for key, row in rows:
                        tok = tokens[int(offsets[row]) : int(offsets[row + 1])]
                        vec = pooled[row : row + 1][0]
                        found[key] = torch.from_numpy(tok), torch.from_numpy(vec)
            except Exception as e:  # damaged, or deleted since it was indexed
                self._quarantine(path, f"{type(e).__name__}: {e}")
        return found

    def _refresh(self) -> None:
        """Index the shard files not seen before (written by us or by another process)."""
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            if path in self._shards:
                continue
            self._shards[path] = False
            try:
                with safe_open(str(path), "np") as f:  # checks the header and file size
                    meta = f.metadata()
                keys = json.loads(meta["keys"])
            except Exception as e:  # safetensors, JSON or key errors
                self._quarantine(path, f"{type(e).__name__}: {e}")
                continue
            if (meta.get("format"), meta.get("encoder")) != (FORMAT, self.id):
                warnings.warn(
                    f"text embedding cache: skipping shard {path}: it is {meta.get('format')} "
                    f"by {meta.get('encoder')}, not {FORMAT} by {self.id}",
                    stacklevel=4,
                )
                continue
            for row, key in enumerate(keys):
                self._index.setdefault(key, (path, row))

    def _quarantine(self, path: Path, reason: str) -> None:
        """Warn, forget the shard's entries and rename it to *.bad so no process reads it again."""
        warnings.warn(
            f"text embedding cache: ignoring shard {path} ({reason}); its captions will be "
            "encoded again. The file is renamed to *.bad",
            stacklevel=5,
        )
        self._index = {k: v for k, v in self._index.items() if v[0] != path}
        with contextlib.suppress(OSError):  # read-only cache, or another process did it
            os.replace(path, path.with_name(path.name + ".bad"))


class TextTable:
    """The embeddings of a fixed list of captions on one device, gathered by caption number:
    `table[index]` equals `CachedTextEncoder.encode` of those captions, bit for bit, with no
    hashing, file access or host copy per batch."""

    def __init__(
        self,
        tokens: Tensor,
        lengths: Tensor,
        pooled: Tensor,
        rows: Tensor,
        max_length: int,
        device: torch.device | str,
    ) -> None:
        """tokens [ΣL + 1, E]: each distinct caption's L real token vectors, packed, then a zero
        row; lengths [U], pooled [U, E] per distinct caption; rows [N]: caption i's number."""
        self.device = torch.device(device)
        self.tokens, self.lengths, self.pooled, self.rows = (
            t.to(self.device) for t in (tokens, lengths, pooled, rows)
        )
        self.starts = (torch.cumsum(self.lengths, 0) - self.lengths).to(self.device)
        self.positions = torch.arange(max_length, device=self.device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes the table takes on its device."""
        parts = (self.tokens, self.lengths, self.pooled, self.rows, self.starts)
        return sum(t.numel() * t.element_size() for t in parts)

    def __getitem__(self, index: Tensor) -> TextEmbeddings:
        """Embeddings of captions `index` (int64 [B], any device), on the table's device."""
        row = self.rows[index.to(self.device, non_blocking=True)]
        mask = self.positions < self.lengths[row, None]
        pad = len(self.tokens) - 1
        source = torch.where(mask, self.starts[row, None] + self.positions, pad)
        return TextEmbeddings(self.tokens[source], mask, self.pooled[row])


def _digest(arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array))  # no copy: they are contiguous
    return h.hexdigest()


def _write_shard(directory: Path, encoder_id: str, pending: dict[str, Entry]) -> None:
    """Write and clear `pending` as one new shard (a warning, not an error, if that fails)."""
    keys, entries = list(pending), list(pending.values())
    pending.clear()
    if not keys:
        return
    arrays = {
        "tokens": torch.cat([tokens for tokens, _ in entries]).numpy(),
        "offsets": np.cumsum([0] + [len(tokens) for tokens, _ in entries], dtype=np.int64),
        "pooled": torch.stack([pooled for _, pooled in entries]).numpy(),
    }
    meta = {"format": FORMAT, "encoder": encoder_id, "keys": json.dumps(keys)}
    meta["sha256"] = _digest(arrays[name] for name in ARRAYS)
    name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
    try:
        atomic_write_bytes(directory / name, save(arrays, metadata=meta))
    except OSError as e:
        warnings.warn(
            f"text embedding cache: {len(keys)} entries stay unwritten: {e}", stacklevel=3
        )
