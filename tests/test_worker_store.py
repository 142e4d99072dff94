"""Model store: URI parsing, the disk cache (capacity, LRU, restarts) and S3 fetches from a real moto server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from ember.worker.disk_cache import CHECKPOINT_DIR, ENTRY_FILE, TMP_DIR, DiskCache, cache_key
from ember.worker.model_store import ModelStore, parse_checkpoint_uri
from ember.worker.s3_source import S3Location, S3Source
from ember.worker.store_errors import (
    CacheFull,
    CheckpointNotFound,
    ErrorKind,
    InvalidCheckpointURI,
)


def make_checkpoint(dst: Path, numel: int = 3000, seed: int = 0) -> Path:
    """A small real Ember checkpoint (one float tensor) converted from a torch state dict."""
    import torch

    from ember.ckpt_format import convert

    src = dst.parent / f"{dst.name}.pt"
    torch.manual_seed(seed)
    torch.save({"w": torch.randn(numel)}, src)
    convert(src, dst)
    return dst


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def upload(client, bucket: str, prefix: str, checkpoint: Path) -> None:
    for f in sorted(checkpoint.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def new_bucket(client) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(s3_server):
    import boto3

    return boto3.client("s3")


# -- URIs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://models/llama/7b", ("models", "llama/7b")),
        ("s3://models/llama/7b/", ("models", "llama/7b")),
        ("s3://models", ("models", "")),
    ],
)
def test_parse_s3_uris(uri: str, expected: tuple[str, str]) -> None:
    parsed = parse_checkpoint_uri(uri)
    assert parsed.s3 == S3Location(*expected)
    assert parsed.canonical == str(S3Location(*expected))


def test_parse_local_uris(tmp_path: Path) -> None:
    assert parse_checkpoint_uri(str(tmp_path)).local_path == tmp_path.resolve()
    assert parse_checkpoint_uri(f"file://{tmp_path}").local_path == tmp_path.resolve()


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("", "empty"),
        ("s3://", "bucket"),
        ("s3://Bad_Bucket/x", "Bad_Bucket"),
        ("s3:/bucket/x", "malformed"),
        ("gs://bucket/x", "'gs'"),
        ("file://otherhost/x", "otherhost"),
        ("s3://bucket/a//b", "segment"),
    ],
)
def test_malformed_uris_are_refused_with_a_reason(uri: str, needle: str) -> None:
    with pytest.raises(InvalidCheckpointURI) as info:
        parse_checkpoint_uri(uri)
    assert needle in str(info.value)
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT


# -- disk cache ------------------------------------------------------------------------------


def add_entry(cache: DiskCache, uri: str, source: Path) -> None:
    pending = cache.begin(uri, dir_bytes(source))
    for f in source.iterdir():
        shutil.copyfile(f, pending.path / f.name)
    cache.commit(pending)


def test_lru_eviction_keeps_recently_used_entries(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    size = dir_bytes(ckpt)
    cache = DiskCache(tmp_path / "cache", capacity_bytes=2 * size)
    add_entry(cache, "s3://b/one", ckpt)
    add_entry(cache, "s3://b/two", ckpt)
    cache.touch("s3://b/one")  # two is now least recently used
    add_entry(cache, "s3://b/three", ckpt)
    assert {e.uri for e in cache.entries()} == {"s3://b/one", "s3://b/three"}
    assert not (tmp_path / "cache" / cache_key("s3://b/two")).exists()
    assert cache.used_bytes == 2 * size


def test_pinned_entries_are_not_evicted(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    size = dir_bytes(ckpt)
    cache = DiskCache(tmp_path / "cache", capacity_bytes=size)
    add_entry(cache, "s3://b/one", ckpt)
    cache.pin("s3://b/one")
    with pytest.raises(CacheFull) as info:
        cache.begin("s3://b/two", size)
    assert "s3://b/one" in str(info.value)
    cache.unpin("s3://b/one")
    add_entry(cache, "s3://b/two", ckpt)
    assert [e.uri for e in cache.entries()] == ["s3://b/two"]


def test_entry_larger_than_the_cache_is_refused(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", capacity_bytes=1000)
    with pytest.raises(CacheFull) as info:
        cache.begin("s3://b/big", 5000)
    assert "--disk-cache-gb" in info.value.hint


def test_inventory_and_lru_order_survive_a_restart(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    cache = DiskCache(tmp_path / "cache", capacity_bytes=10 * dir_bytes(ckpt))
    for name in ("a", "b", "c"):
        add_entry(cache, f"s3://bkt/{name}", ckpt)
    cache.touch("s3://bkt/a")
    before = [(e.uri, e.bytes, e.last_used) for e in cache.entries()]
    reopened = DiskCache(tmp_path / "cache", capacity_bytes=10 * dir_bytes(ckpt))
    assert [(e.uri, e.bytes, e.last_used) for e in reopened.entries()] == before
    assert reopened.entries()[0].uri == "s3://bkt/a"
    assert reopened.dropped_at_start == []


def test_partial_and_broken_entries_are_dropped_at_start(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    root = tmp_path / "cache"
    cache = DiskCache(root, capacity_bytes=10 * dir_bytes(ckpt))
    add_entry(cache, "s3://bkt/good", ckpt)
    add_entry(cache, "s3://bkt/truncated", ckpt)
    add_entry(cache, "s3://bkt/no-meta", ckpt)
    pending = cache.begin("s3://bkt/in-flight", dir_bytes(ckpt))  # a download cut by a crash
    (pending.path / "part-00000.bin").write_bytes(b"x" * 10)
    part = root / cache_key("s3://bkt/truncated") / CHECKPOINT_DIR / "part-00000.bin"
    os.truncate(part, part.stat().st_size - 4096)
    (root / cache_key("s3://bkt/no-meta") / ENTRY_FILE).unlink()

    reopened = DiskCache(root, capacity_bytes=10 * dir_bytes(ckpt))
    assert [e.uri for e in reopened.entries()] == ["s3://bkt/good"]
    assert len(reopened.dropped_at_start) == 2
    assert not (root / TMP_DIR).exists()
    assert sorted(p.name for p in root.iterdir()) == [cache_key("s3://bkt/good")]


# -- S3 --------------------------------------------------------------------------------------


def test_s3_fetch_writes_identical_files_with_parallel_ranges(tmp_path: Path, s3) -> None:
    ckpt = make_checkpoint(tmp_path / "c", numel=1_500_000)  # 6 MB: several 1 MiB ranges
    bucket = new_bucket(s3)
    upload(s3, bucket, "models/m", ckpt)
    seen: list[tuple[int, int]] = []
    source = S3Source(threads=4, part_bytes=1 << 20)
    stats = source.fetch(S3Location(bucket, "models/m"), tmp_path / "out", lambda d, t: seen.append((d, t)))
    for f in ckpt.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()
    assert stats.bytes == dir_bytes(ckpt)
    assert seen[-1][0] == seen[-1][1] == stats.bytes


def test_s3_missing_bucket_key_and_file_are_not_found(tmp_path: Path, s3) -> None:
    source = S3Source()
    with pytest.raises(CheckpointNotFound) as info:
        source.plan(S3Location("no-such-bucket-ember", "m"))
    assert "no-such-bucket-ember" in str(info.value)

    bucket = new_bucket(s3)
    with pytest.raises(CheckpointNotFound) as info:
        source.plan(S3Location(bucket, "absent"))
    assert "absent/ember.json" in str(info.value) and bucket in str(info.value)

    ckpt = make_checkpoint(tmp_path / "c")
    upload(s3, bucket, "partial", ckpt)
    s3.delete_object(Bucket=bucket, Key="partial/part-00000.bin")
    with pytest.raises(CheckpointNotFound) as info:
        source.plan(S3Location(bucket, "partial"))
    assert "partial/part-00000.bin" in str(info.value)


def test_store_fetches_once_then_serves_from_disk(tmp_path: Path, s3) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    bucket = new_bucket(s3)
    upload(s3, bucket, "m", ckpt)
    uri = f"s3://{bucket}/m"

    async def scenario() -> tuple[str, str, str]:
        store = ModelStore(tmp_path / "cache", disk_capacity_bytes=10 << 20)
        inspection = await store.inspect(uri)
        assert inspection.plan is not None and inspection.index.total_bytes > 0
        first = await store.locate(inspection)
        store.release(first)
        second = await store.locate(uri)
        store.release(second)
        # A new store over the same directory (a restarted worker) still has it on disk.
        third = await ModelStore(tmp_path / "cache", disk_capacity_bytes=10 << 20).locate(uri)
        return first.tier, second.tier, third.tier

    assert asyncio.run(scenario()) == ("s3", "disk", "disk")


def test_store_refetch_replaces_a_corrupt_entry(tmp_path: Path, s3) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    bucket = new_bucket(s3)
    upload(s3, bucket, "m", ckpt)

    async def scenario() -> None:
        store = ModelStore(tmp_path / "cache", disk_capacity_bytes=10 << 20)
        located = await store.locate(f"s3://{bucket}/m")
        part = located.path / "part-00000.bin"
        data = bytearray(part.read_bytes())
        data[100] ^= 0xFF
        part.write_bytes(bytes(data))
        again = await store.refetch(located)
        assert again.tier == "s3"
        assert (again.path / "part-00000.bin").read_bytes() == (ckpt / "part-00000.bin").read_bytes()

    asyncio.run(scenario())


def test_local_paths_are_read_in_place(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")

    async def scenario() -> None:
        store = ModelStore(tmp_path / "cache", disk_capacity_bytes=0)
        located = await store.locate(f"file://{ckpt}")
        assert located.path == ckpt.resolve() and located.tier == "disk" and not located.cached
        with pytest.raises(CheckpointNotFound):
            await store.inspect(str(tmp_path / "missing"))
        (tmp_path / "plain").mkdir()
        with pytest.raises(CheckpointNotFound) as info:
            await store.inspect(str(tmp_path / "plain"))
        assert "ember convert" in info.value.hint

    asyncio.run(scenario())


def test_cache_entry_metadata_is_json_with_last_use(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    cache = DiskCache(tmp_path / "cache", capacity_bytes=1 << 20)
    add_entry(cache, "s3://bkt/x", ckpt)
    meta = json.loads((tmp_path / "cache" / cache_key("s3://bkt/x") / ENTRY_FILE).read_text())
    assert meta["uri"] == "s3://bkt/x" and meta["bytes"] == dir_bytes(ckpt) and meta["last_used"] > 0
