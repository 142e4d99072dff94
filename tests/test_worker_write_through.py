"""S3 downloads written through into the DRAM pool (real moto server, real files, real DramPool):
the next load is a DRAM hit with the exact bytes; a corrupt object or a checkpoint the pool cannot
hold leaves the pool as it was."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch
from conftest import upload_checkpoint

from ember.ckpt_format.errors import CorruptChunkError
from ember.ckpt_format.index import open_checkpoint
from ember.ckpt_format.reader import read_state_dict
from ember.loader import DramPool, last_load_stats, load_state_dict
from ember.worker.disk_cache import TMP_DIR
from ember.worker.model_store import ModelStore
from ember.worker.s3_source import S3Source
from ember.worker.write_through import fetch_through_pool

# Ranges that are not multiples of the checksum chunk (16 KiB) nor of the page size: verification
# must not depend on how the download was cut.
PART_BYTES = (1 << 20) + 12345


def tensors(seed: int, rows: int = 2048) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(rows, 256, generator=g),  # 2 MiB: several ranges per partition
        "layer.w": torch.randn(256, 256, generator=g).bfloat16(),
        "norm": torch.randn(256, generator=g),
    }


def assert_same(out: dict, ref: dict) -> None:
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


@pytest.fixture
def s3(s3_server):
    import boto3

    return boto3.client("s3")


def store_with_pool(tmp_path: Path, pool: DramPool) -> ModelStore:
    return ModelStore(tmp_path / "cache", disk_capacity_bytes=64 << 20, dram_pool=pool,
                      s3=S3Source(threads=4, part_bytes=PART_BYTES))


def pooled_bytes(pool: DramPool, checkpoint: Path) -> list[bytes]:
    lease = pool.lease(open_checkpoint(checkpoint))
    assert lease is not None, f"{checkpoint} is not in the pool"
    return [t.numpy().tobytes() for t in lease.tensors]


def test_a_fetch_leaves_the_checkpoint_in_the_pool_and_the_load_is_a_dram_hit(tmp_path, s3, make_checkpoint):
    ckpt = make_checkpoint(tensors(0), partitions=2)
    location = upload_checkpoint(ckpt)
    pool = DramPool(64 << 20, pin=False)
    store = store_with_pool(tmp_path, pool)

    located = asyncio.run(store.locate(str(location)))
    assert located.tier == "s3" and located.cached and located.fetch is not None
    index = open_checkpoint(ckpt)
    [entry] = pool.contents()
    assert entry.path == str(located.path.resolve()) and entry.partitions == 2 and not entry.in_use
    assert pool.used_bytes == entry.nbytes == index.total_bytes
    # The slabs hold exactly the partition files, and the disk cache entry holds them too.
    assert pooled_bytes(pool, located.path) == [(ckpt / p.file).read_bytes() for p in index.partitions]
    for f in ckpt.iterdir():
        assert (located.path / f.name).read_bytes() == f.read_bytes(), f.name

    out = load_state_dict(located.path, pool=pool)
    stats = last_load_stats()
    assert stats.tier == "dram" and stats.zero_copy and not stats.direct_io
    assert_same(out, read_state_dict(ckpt))
    store.release(located)


def test_a_corrupt_object_in_s3_is_refused_naming_it_and_the_pool_is_unchanged(tmp_path, s3, make_checkpoint):
    ckpt = make_checkpoint(tensors(1), partitions=2)
    index = open_checkpoint(ckpt)
    part = index.partitions[1].file
    chunk = index.num_chunks(1) - 3
    start, end = index.chunk_range(1, chunk)
    location = upload_checkpoint(ckpt)
    data = bytearray((ckpt / part).read_bytes())
    data[(start + end) // 2] ^= 0x01  # one flipped bit: the size still matches
    s3.put_object(Bucket=location.bucket, Key=location.key(part), Body=bytes(data))

    pool = DramPool(64 << 20, pin=False)
    other = make_checkpoint(tensors(2))
    kept = load_state_dict(other, pool=pool)  # already pooled: must stay, untouched
    before = [(e.path, e.nbytes) for e in pool.contents()]
    used = pool.used_bytes
    store = store_with_pool(tmp_path, pool)

    with pytest.raises(CorruptChunkError) as info:
        asyncio.run(store.locate(str(location)))
    err = info.value
    message = str(err)
    assert f"s3://{location.bucket}/m/{part}" in message and f"chunk {chunk}" in message, message
    assert err.chunk == chunk and (err.start, err.end) == (start, end)
    assert "re-upload" in err.hint
    # No entry, no reservation left behind; nothing half-downloaded on disk either.
    assert [(e.path, e.nbytes) for e in pool.contents()] == before and pool.used_bytes == used
    assert store.disk_entries() == [] and store.disk.used_bytes == 0
    assert list((tmp_path / "cache" / "disk" / TMP_DIR).iterdir()) == []
    assert_same(kept, read_state_dict(other))


def test_a_checkpoint_larger_than_the_pool_is_fetched_to_disk_only(tmp_path, s3, make_checkpoint):
    ckpt = make_checkpoint(tensors(3), partitions=2)
    location = upload_checkpoint(ckpt)
    pool = DramPool(open_checkpoint(ckpt).total_bytes - 4096, pin=False)
    store = store_with_pool(tmp_path, pool)

    located = asyncio.run(store.locate(str(location)))
    assert located.tier == "s3"
    assert pool.contents() == [] and pool.used_bytes == 0
    out = load_state_dict(located.path, pool=pool)
    assert last_load_stats().tier == "disk"  # as before write-through: read back from the disk cache
    assert_same(out, read_state_dict(ckpt))
    assert pool.contents() == []


def test_without_a_pool_the_fetch_is_the_plain_download(tmp_path, s3, make_checkpoint):
    ckpt = make_checkpoint(tensors(4))
    location = upload_checkpoint(ckpt)
    source = S3Source(threads=2, part_bytes=PART_BYTES)
    plan = source.plan(location)
    stats = fetch_through_pool(source, None, location, tmp_path / "out", plan, load_path=tmp_path / "out")
    assert stats.bytes == plan.total_bytes
    for f in ckpt.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_an_already_pooled_checkpoint_is_not_filled_twice(tmp_path, s3, make_checkpoint):
    """The disk cache dropped an entry the pool still holds: the new download refreshes the disk
    copy, the pool keeps its (verified) slabs and the load is still a DRAM hit."""
    ckpt = make_checkpoint(tensors(5))
    location = upload_checkpoint(ckpt)
    pool = DramPool(64 << 20, pin=False)
    store = store_with_pool(tmp_path, pool)
    first = asyncio.run(store.locate(str(location)))
    store.release(first)
    slabs = pooled_bytes(pool, first.path)
    gc.collect()
    store.disk.drop(str(location))
    assert first.path in pool and not first.path.exists()

    again = asyncio.run(store.locate(str(location)))
    assert again.tier == "s3" and again.path == first.path
    assert [e.nbytes for e in pool.contents()] == [open_checkpoint(ckpt).total_bytes]
    assert pooled_bytes(pool, again.path) == slabs
    load_state_dict(again.path, pool=pool)
    assert last_load_stats().tier == "dram"


def test_an_object_of_the_wrong_size_is_left_to_the_load_to_name(tmp_path, s3, make_checkpoint):
    from ember.ckpt_format.errors import PartitionSizeError

    ckpt = make_checkpoint(tensors(6))
    location = upload_checkpoint(ckpt)
    part = open_checkpoint(ckpt).partitions[0].file
    s3.put_object(Bucket=location.bucket, Key=location.key(part), Body=(ckpt / part).read_bytes()[:-4096])
    pool = DramPool(64 << 20, pin=False)
    store = store_with_pool(tmp_path, pool)

    located = asyncio.run(store.locate(str(location)))
    assert pool.contents() == [] and pool.used_bytes == 0
    with pytest.raises(PartitionSizeError, match=part):
        load_state_dict(located.path, pool=pool)
