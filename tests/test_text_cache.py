"""The embedding cache: hits are exact, misses are encoded once, damage is never trusted."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from greedygrow.text import TextEmbeddings, load_text_encoder
from greedygrow.text_cache import CachedTextEncoder, caption_key

CAPTIONS = [
    "three red circles and a blue square",
    "a picture with two yellow triangles",
    "",
    "one green striped star",
]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


class CountingEncoder:
    """Wraps an encoder and records every caption it is asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.id, self.dim, self.max_length, self.device = (
            inner.id,
            inner.dim,
            inner.max_length,
            inner.device,
        )
        self.seen: list[str] = []

    def encode(self, captions):
        self.seen.extend(captions)
        return self.inner.encode(captions)


def _assert_same(a: TextEmbeddings, b: TextEmbeddings) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.pooled, b.pooled)


def test_cache_hit_returns_identical_tensors_without_encoding(minilm, tmp_path):
    counting = CountingEncoder(minilm)
    captions = [*CAPTIONS, CAPTIONS[0]]  # a duplicate is encoded once
    with CachedTextEncoder(counting, tmp_path) as cached:
        first = cached.encode(captions)
    assert sorted(counting.seen) == sorted(CAPTIONS) and cached.misses == 4
    _assert_same(first, minilm.encode(captions))  # the cache returns what the encoder gave
    assert list(cached.directory.glob("shard-*.safetensors"))

    counting.seen.clear()
    again = CachedTextEncoder(counting, tmp_path)  # a fresh process's view: from disk only
    second = again.encode(captions)
    assert counting.seen == [] and again.hits == 4 and again.misses == 0
    _assert_same(first, second)
    assert len(again) == 4 and again.size_bytes() > 0 and again.id == minilm.id


class FakeEncoder:
    """A fast deterministic stand-in: each caption's vectors come from a generator it seeds."""

    def __init__(self, id: str = "fake@6", dim: int = 8, max_length: int = 6):
        self.id, self.dim, self.max_length, self.device = id, dim, max_length, torch.device("cpu")
        self.seen: list[str] = []

    def encode(self, captions):
        self.seen.extend(captions)
        n, t, e = len(captions), self.max_length, self.dim
        out = TextEmbeddings(
            torch.zeros(n, t, e), torch.zeros(n, t, dtype=torch.bool), torch.zeros(n, e)
        )
        for i, caption in enumerate(captions):
            g = torch.Generator().manual_seed(int(caption_key(caption)[:15], 16))
            length = min(t, len(caption.split()) + 1)
            out.tokens[i, :length] = torch.randn(length, e, generator=g)
            out.mask[i, :length] = True
            out.pooled[i] = torch.randn(e, generator=g)
        return out


def test_cache_encodes_only_misses_and_picks_up_other_writers(tmp_path):
    a, b = FakeEncoder(), FakeEncoder()
    reader = CachedTextEncoder(b, tmp_path)  # opened before anything is written
    writer = CachedTextEncoder(a, tmp_path)
    writer.encode(CAPTIONS[:2])
    writer.flush()
    out = reader.encode(CAPTIONS[:3])
    assert b.seen == [CAPTIONS[2]]  # the two written by the other instance were found
    _assert_same(out, FakeEncoder().encode(CAPTIONS[:3]))


def test_cache_writes_a_shard_every_shard_size_entries(tmp_path):
    cached = CachedTextEncoder(FakeEncoder(), tmp_path, shard_size=2)
    cached.encode(CAPTIONS[:3])
    shards = list(cached.directory.glob("shard-*.safetensors"))
    assert len(shards) == 1  # 2 written, 1 still buffered
    cached.flush()
    assert len(list(cached.directory.glob("shard-*.safetensors"))) == 2
    assert not list(cached.directory.glob(".tmp-*"))


def test_cache_is_keyed_by_encoder_id(tmp_path):
    with CachedTextEncoder(FakeEncoder("fake@6"), tmp_path) as first:
        first.encode(CAPTIONS)
    other = FakeEncoder("fake@4", max_length=4)
    out = CachedTextEncoder(other, tmp_path).encode(CAPTIONS)
    assert sorted(other.seen) == sorted(CAPTIONS) and out.tokens.shape[1] == 4


def _filled_cache(encoder, path: Path) -> Path:
    with CachedTextEncoder(encoder, path) as cached:
        cached.encode(CAPTIONS)
    (shard,) = cached.directory.glob("shard-*.safetensors")
    return shard


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip-data-byte", "tmp-leftover"])
def test_damaged_cache_shard_is_reencoded_with_a_warning(tmp_path, damage):
    shard = _filled_cache(FakeEncoder(), tmp_path)
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(b"not a safetensors file")
    elif damage == "flip-data-byte":  # the header stays valid: only the checksum can tell
        start = 8 + int.from_bytes(data[:8], "little")  # u64 header size, header, then data
        pos = (start + len(data)) // 2
        shard.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    else:  # a writer died mid-write: its temp file must be ignored silently
        (shard.parent / ".tmp-shard-0-0-dead.safetensors").write_bytes(data[:100])
    counting = FakeEncoder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = CachedTextEncoder(counting, tmp_path).encode(CAPTIONS)
    _assert_same(out, FakeEncoder().encode(CAPTIONS))
    cache_warnings = [w for w in caught if "text embedding cache" in str(w.message)]
    if damage == "tmp-leftover":
        assert counting.seen == [] and not cache_warnings
    else:
        assert counting.seen, "damaged entries must be re-encoded"
        assert cache_warnings and str(shard) in str(cache_warnings[0].message)
        if damage == "flip-data-byte":
            assert "checksum mismatch" in str(cache_warnings[0].message)
        assert shard.with_name(shard.name + ".bad").exists()  # quarantined, not read again


def test_foreign_shard_is_skipped_but_left_in_place(tmp_path):
    shard = _filled_cache(FakeEncoder("fake@6"), tmp_path / "a")
    other = FakeEncoder("other@6")
    target = CachedTextEncoder(other, tmp_path / "b").directory / shard.name
    shutil.copy(shard, target)  # e.g. copied into the wrong folder by hand
    with pytest.warns(UserWarning, match="skipping shard .* by fake@6"):
        CachedTextEncoder(other, tmp_path / "b").encode(CAPTIONS)
    assert sorted(other.seen) == sorted(CAPTIONS) and target.exists()


def test_shard_deleted_after_indexing_is_reencoded(tmp_path):
    shard = _filled_cache(FakeEncoder(), tmp_path)
    counting = FakeEncoder()
    cached = CachedTextEncoder(counting, tmp_path)  # indexes the shard
    shard.unlink()
    with pytest.warns(UserWarning, match="text embedding cache"):
        out = cached.encode(CAPTIONS[:2])
    assert counting.seen == CAPTIONS[:2]
    _assert_same(out, FakeEncoder().encode(CAPTIONS[:2]))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x


def test_text_table_rows_are_bit_identical_to_encoding_through_the_cache(minilm, tmp_path):
    long = " ".join(["a red circle and"] * 12)  # truncated at max_length tokens
    captions = [*CAPTIONS, long, CAPTIONS[1]]
    table = CachedTextEncoder(minilm, tmp_path).table(captions, "cpu", 1 << 30)  # cold
    warm = CachedTextEncoder(CountingEncoder(minilm), tmp_path)
    from_disk = warm.table(captions, "cpu", 1 << 30)
    assert warm.encoder.seen == [] and len(table) == len(captions)
    index = torch.tensor([5, 0, 4, 2, 2, 3])
    want = warm.encode([captions[i] for i in index])  # what training read before the table
    for got in (table[index], from_disk[index]):
        for name in ("tokens", "mask", "pooled"):
            assert torch.equal(_bits(getattr(got, name)), _bits(getattr(want, name))), name
    _assert_same(want, minilm.encode([captions[i] for i in index]))  # (its padding: −0 or 0)


def test_text_table_over_its_budget_is_refused_but_its_captions_stay_cached(tmp_path):
    cached = CachedTextEncoder(FakeEncoder(), tmp_path)
    assert cached.table(CAPTIONS, "cpu", max_bytes=100) is None
    cached.flush()
    counting = FakeEncoder()
    table = CachedTextEncoder(counting, tmp_path).table(CAPTIONS, "cpu", 1 << 20)
    assert counting.seen == [] and table.nbytes < 1 << 20
    _assert_same(table[torch.arange(4)], FakeEncoder().encode(CAPTIONS))


def test_caption_key_is_stable_and_distinguishes_captions():
    assert caption_key("a red circle") == caption_key("a red circle")
    assert caption_key("") != caption_key(" ") and len(caption_key("")) == 32


# ------------------------------------------------------------------------------ encode-text


def _run_cli(*argv: str) -> int | str:
    from greedygrow.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


def test_encode_text_caches_every_scenes_caption(minilm, tmp_path, capsys):
    from greedygrow.data import sample_scene

    assert _run_cli("encode-text", "--data", "scenes:12", "--cache", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "captions: 12;" in out and "minilm-l6-v2@32" in out
    captions = [sample_scene(0, i).caption for i in range(12)]
    counting = CountingEncoder(minilm)
    CachedTextEncoder(counting, tmp_path).encode(captions)
    assert counting.seen == []  # all were precomputed
    assert _run_cli("encode-text", "--data", "scenes:12", "--cache", str(tmp_path)) == 0
    assert "encoded now: 0 distinct" in capsys.readouterr().out


def test_encode_text_reads_folder_captions(minilm, tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    captions = ["a red circle", "two blue squares", "a green star"]
    for i, caption in enumerate(captions):
        Image.new("RGB", (40, 40), (i * 80, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    cache = tmp_path / "cache"
    assert _run_cli("encode-text", "--data", str(data), "--cache", str(cache)) == 0
    assert "encoded now: 3 distinct" in capsys.readouterr().out
    counting = CountingEncoder(minilm)
    CachedTextEncoder(counting, cache).encode(captions)
    assert counting.seen == []


def test_encode_text_reads_webdataset_shards(minilm, tmp_path, capsys):
    from greedygrow.data import sample_scene, write_dataset

    write_dataset(tmp_path / "wds", 6, 32, "webdataset", 3)
    cache = tmp_path / "cache"
    pattern = str(tmp_path / "wds" / "{00000..00000}.tar")
    assert _run_cli("encode-text", "--data", pattern, "--cache", str(cache)) == 0
    assert "captions: 6;" in capsys.readouterr().out
    counting = CountingEncoder(minilm)
    CachedTextEncoder(counting, cache).encode([sample_scene(3, i).caption for i in range(6)])
    assert counting.seen == []


def test_encode_text_rejects_unknown_data(tmp_path, capsys):
    assert _run_cli("encode-text", "--data", "scenes:", "--cache", str(tmp_path)) == 2
    assert "scenes need a count" in capsys.readouterr().err
    error = _run_cli("encode-text", "--data", str(tmp_path / "nope"), "--cache", str(tmp_path))
    assert error == 2 and "neither scenes:COUNT" in capsys.readouterr().err
