"""S3 faults while a download writes through into the DRAM pool (a proxy in front of moto injects
them): a stalled range is resumed into the slab exactly as into the file; a download that fails or
is cancelled leaves the pool as it was (no entry, no reservation) and no disk entry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import upload_checkpoint
from s3_fault_proxy import S3FaultProxy

from ember.ckpt_format.index import open_checkpoint
from ember.ckpt_format.reader import read_state_dict
from ember.loader import DramPool, last_load_stats, load_state_dict
from ember.loader.hostmem import HostBuffer
from ember.worker.disk_cache import TMP_DIR
from ember.worker.model_store import ModelStore
from ember.worker.s3_source import S3Settings, S3Source
from ember.worker.store_errors import StoreError

pytestmark = pytest.mark.timeout(240)

TRANSIENT = S3Settings(connect_timeout_s=2.0, read_timeout_s=1.0, max_attempts=5)
PERSISTENT = S3Settings(connect_timeout_s=2.0, read_timeout_s=0.5, max_attempts=2)


@pytest.fixture
def proxy(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """The fault proxy, with this process's boto3 clients pointed at it (uploads go direct)."""
    with S3FaultProxy(s3_server) as p:
        yield p, lambda: monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)


@pytest.fixture
def busy_pool(make_checkpoint):
    """A pool that already holds another model (what must survive a failed write-through)."""
    import torch

    other = make_checkpoint({"w": torch.arange(300_000, dtype=torch.float32)})
    pool = DramPool(256 << 20, pin=False)
    kept = load_state_dict(other, pool=pool)
    return pool, other, kept


def assert_pool_as_before(pool: DramPool, other: Path, kept: dict) -> None:
    assert [e.path for e in pool.contents()] == [str(other.resolve())]
    assert pool.used_bytes == open_checkpoint(other).total_bytes  # no reservation left behind
    ref = read_state_dict(other)
    assert all(kept[k].equal(ref[k]) for k in ref)


def test_a_stalled_range_is_resumed_into_the_slab_exactly(proxy, demo_checkpoint: Path, tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    source = S3Source(threads=2, part_bytes=4 << 20, settings=TRANSIENT)
    plan = source.plan(location)
    mirror = {part.file: HostBuffer(part.size) for part in plan.index.partitions}
    # 1.5 MiB arrive, then silence: the retry asks for the rest of the range only.
    p.faults.stall_after = 3 << 19
    p.faults.stall_next = 2
    source.fetch(location, tmp_path / "out", plan=plan, mirror=mirror)
    assert p.faults.stalled == 2
    starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in p.faults.ranges]
    assert any(start % (4 << 20) for start in starts), p.faults.ranges
    for name, buf in mirror.items():
        written = (tmp_path / "out" / name).read_bytes()
        assert written == (demo_checkpoint / name).read_bytes()
        assert bytes(buf.view()) == written, name


def test_a_store_load_after_stalls_is_a_dram_hit(proxy, demo_checkpoint: Path, tmp_path: Path) -> None:
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    pool = DramPool(256 << 20, pin=False)
    store = ModelStore(tmp_path / "cache", 64 << 20, dram_pool=pool,
                       s3=S3Source(threads=2, part_bytes=4 << 20, settings=TRANSIENT))
    p.faults.stall_after = 3 << 19
    p.faults.stall_next = 1
    located = asyncio.run(store.locate(str(location)))
    assert p.faults.stalled == 1 and located.path in pool
    out = load_state_dict(located.path, pool=pool)
    assert last_load_stats().tier == "dram"
    ref = read_state_dict(demo_checkpoint)
    assert out.keys() == ref.keys() and all(out[k].equal(ref[k]) for k in ref)


def test_a_failing_download_leaves_the_pool_consistent(proxy, demo_checkpoint: Path, tmp_path: Path,
                                                       busy_pool) -> None:
    pool, other, kept = busy_pool
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    store = ModelStore(tmp_path / "cache", 64 << 20, dram_pool=pool,
                       s3=S3Source(threads=2, part_bytes=1 << 20, settings=PERSISTENT))
    p.faults.stall_all = True  # every range: its first 64 KiB, then silence
    with pytest.raises(StoreError) as info:
        asyncio.run(store.locate(str(location)))
    assert "timed out" in info.value.full_message()
    assert_pool_as_before(pool, other, kept)
    assert store.disk_entries() == [] and store.disk.used_bytes == 0

    # The pool and the store keep working: the same checkpoint, once S3 behaves, is written through.
    p.faults.stall_all = False
    located = asyncio.run(store.locate(str(location)))
    assert located.path in pool
    load_state_dict(located.path, pool=pool)
    assert last_load_stats().tier == "dram"


def test_a_cancelled_download_leaves_the_pool_consistent(proxy, demo_checkpoint: Path, tmp_path: Path,
                                                         busy_pool) -> None:
    pool, other, kept = busy_pool
    p, through_proxy = proxy
    location = upload_checkpoint(demo_checkpoint)
    through_proxy()
    total = open_checkpoint(demo_checkpoint).total_bytes
    store = ModelStore(tmp_path / "cache", 64 << 20, dram_pool=pool,
                       s3=S3Source(threads=2, part_bytes=1 << 20, settings=TRANSIENT))
    p.faults.delay_s = 0.3  # a slow store: the load is cancelled while ranges are still coming in

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        task = asyncio.create_task(store.locate(str(location), lambda done, _: loop.call_soon_threadsafe(arrived.set)))
        await arrived.wait()
        reserved = pool.used_bytes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return reserved

    # asyncio.run returns once the download thread has stopped (it waits for the executor).
    reserved = asyncio.run(scenario())
    assert reserved == open_checkpoint(other).total_bytes + total  # the fill was in progress
    assert_pool_as_before(pool, other, kept)
    assert store.disk_entries() == [] and store.disk.used_bytes == 0
    assert not list((tmp_path / "cache" / "disk" / TMP_DIR).iterdir())
    # It stopped early: not every 1 MiB range of the weights was asked for.
    ranges = sum(-(-part.size // (1 << 20)) for part in open_checkpoint(demo_checkpoint).partitions)
    assert len(p.faults.ranges) < ranges, p.faults.ranges
