"""The DRAM tier: zero-copy hits, LRU eviction by bytes, buffer reuse that never touches a live
model, concurrent loads, and a corrupt chunk mid-stream leaving the pool as it was."""

from __future__ import annotations

import gc
import shutil
import threading

import pytest
import torch

from ember.ckpt_format.errors import CorruptChunkError
from ember.ckpt_format.index import open_checkpoint
from ember.ckpt_format.reader import read_state_dict
from ember.loader import DramPool, last_load_stats, load_state_dict


def model_tensors(seed: int, rows: int = 512) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(rows, 256, generator=g),
        "layer.w": torch.randn(256, 256, generator=g).bfloat16(),
        "norm": torch.randn(256, generator=g),
    }


def assert_same(out, ref):
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


def buffer_range(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def test_dram_hit_is_zero_copy(make_checkpoint):
    ckpt = make_checkpoint(model_tensors(0), partitions=2)
    pool = DramPool(64 << 20, pin=False)
    first = load_state_dict(ckpt, pool=pool)
    assert last_load_stats().tier == "disk"
    second = load_state_dict(ckpt, pool=pool)
    stats = last_load_stats()
    assert stats.tier == "dram" and stats.zero_copy and not stats.direct_io
    for name in first:
        assert second[name].data_ptr() == first[name].data_ptr()  # same memory, no copy
    assert_same(second, read_state_dict(ckpt))
    [entry] = pool.contents()
    assert entry.path == str(ckpt.resolve()) and entry.partitions == 2 and entry.in_use
    assert entry.nbytes == open_checkpoint(ckpt).total_bytes == pool.used_bytes
    assert ckpt in pool and str(ckpt) in pool


def test_lru_eviction_under_capacity(make_checkpoint):
    a, b, c = (make_checkpoint(model_tensors(i)) for i in range(3))
    size = open_checkpoint(a).total_bytes
    pool = DramPool(2 * size + size // 2, pin=False)  # room for two models
    for ckpt in (a, b):
        load_state_dict(ckpt, pool=pool)
    load_state_dict(a, pool=pool)  # hit: a is now the most recently used
    assert last_load_stats().tier == "dram"
    load_state_dict(c, pool=pool)  # needs room: evicts b, the least recently used
    assert [e.path for e in pool.contents()] == [str(a.resolve()), str(c.resolve())]
    assert pool.used_bytes == 2 * size <= pool.capacity_bytes
    assert b not in pool
    load_state_dict(b, pool=pool)
    assert last_load_stats().tier == "disk"
    assert [e.path for e in pool.contents()] == [str(c.resolve()), str(b.resolve())]


def test_checkpoint_bigger_than_the_pool_loads_without_it(make_checkpoint):
    ckpt = make_checkpoint(model_tensors(1))
    pool = DramPool(open_checkpoint(ckpt).total_bytes - 4096, pin=False)
    out = load_state_dict(ckpt, pool=pool)
    assert_same(out, read_state_dict(ckpt))
    assert pool.contents() == [] and pool.used_bytes == 0


def test_eviction_never_corrupts_a_live_model(make_checkpoint):
    a, b, c = (make_checkpoint(model_tensors(i)) for i in range(3))
    size = open_checkpoint(a).total_bytes
    pool = DramPool(size, pin=False)  # one model at a time
    live = load_state_dict(a, pool=pool)
    ref_a = {k: v.clone() for k, v in live.items()}
    a_range = buffer_range(live["embed"])
    out_b = load_state_dict(b, pool=pool)  # evicts a while `live` still views its memory
    assert a not in pool and b in pool
    b_range = buffer_range(out_b["embed"])
    assert b_range != a_range  # a's buffer was not recycled for b
    assert_same(live, ref_a)
    assert_same(out_b, read_state_dict(b))

    del out_b
    gc.collect()
    out_c = load_state_dict(c, pool=pool)  # evicts b; nobody views b, so its pages are reused
    assert buffer_range(out_c["embed"]) == b_range
    assert_same(out_c, read_state_dict(c))
    assert_same(live, ref_a)

    del live
    gc.collect()
    # a's memory is released once its model is gone: it does not fit beside c as a spare
    assert pool.spare_bytes == 0 and pool.used_bytes == size


def test_unviewed_evicted_buffers_are_reused(make_checkpoint):
    a, b = (make_checkpoint(model_tensors(i)) for i in range(2))
    size = open_checkpoint(a).total_bytes
    pool = DramPool(size, pin=False)
    out = load_state_dict(a, pool=pool)
    a_start = buffer_range(out["embed"])[0]
    del out
    gc.collect()
    pool.evict(a)
    assert pool.used_bytes == 0 and pool.spare_bytes == size
    out_b = load_state_dict(b, pool=pool)
    assert buffer_range(out_b["embed"])[0] == a_start  # the touched pages were recycled
    assert_same(out_b, read_state_dict(b))
    assert pool.spare_bytes == 0 and pool.used_bytes == size
    assert pool.trim() == 0


def test_two_models_load_concurrently(make_checkpoint):
    ckpts = [make_checkpoint(model_tensors(i, rows=2048), partitions=2) for i in range(2)]
    pool = DramPool(256 << 20, pin=False)
    results: dict[int, dict] = {}
    tiers: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = load_state_dict(ckpts[i], pool=pool, threads=3, chunk_mb=0.05)
            tiers[i] = last_load_stats().tier
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ckpt in enumerate(ckpts):
        assert_same(results[i], read_state_dict(ckpt))
    assert tiers == {0: "disk", 1: "disk"}
    assert {e.path for e in pool.contents()} == {str(c.resolve()) for c in ckpts}


def test_same_model_concurrently_reads_the_disk_once(make_checkpoint):
    ckpt = make_checkpoint(model_tensors(5, rows=4096))
    pool = DramPool(256 << 20, pin=False)
    tiers: list[str] = []
    outs: list[dict] = []
    start = threading.Barrier(3)
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        out = load_state_dict(ckpt, pool=pool, threads=2, chunk_mb=0.05)
        with lock:
            outs.append(out)
            tiers.append(last_load_stats().tier)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(tiers) == ["disk", "dram", "dram"]
    ref = read_state_dict(ckpt)
    for out in outs:
        assert_same(out, ref)


def corrupt(src, dst, partition: int, chunk: int) -> None:
    shutil.copytree(src, dst)
    index = open_checkpoint(dst)
    start, end = index.chunk_range(partition, chunk)
    path = index.partition_path(partition)
    with open(path, "r+b") as f:
        f.seek(start + (end - start) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("threads", [1, 4])
def test_corrupt_chunk_mid_stream(make_checkpoint, tmp_path, threads):
    good = make_checkpoint(model_tensors(0), partitions=2)
    other = make_checkpoint(model_tensors(1))
    bad = tmp_path / "bad"
    index = open_checkpoint(good)
    chunk = index.num_chunks(1) - 2  # a later chunk of the second partition
    corrupt(good, bad, 1, chunk)

    pool = DramPool(64 << 20, pin=False)
    kept = load_state_dict(other, pool=pool)
    before = pool.contents()
    used = pool.used_bytes

    with pytest.raises(CorruptChunkError) as info:
        load_state_dict(bad, pool=pool, threads=threads, chunk_mb=0.05)
    err = info.value
    assert err.chunk == chunk and err.file.name == index.partitions[1].file
    assert f"chunk {chunk}" in str(err) and index.partitions[1].file in str(err) and err.hint
    # the pool is exactly as before: no entry, no leaked reservation
    assert [e.path for e in pool.contents()] == [e.path for e in before]
    assert pool.used_bytes == used
    assert bad not in pool
    assert_same(kept, read_state_dict(other))
    # and it keeps working: the good copy loads (reusing the failed load's buffers) and is served again
    assert_same(load_state_dict(good, pool=pool), read_state_dict(good))
    assert_same(load_state_dict(good, pool=pool), read_state_dict(good))
    assert last_load_stats().tier == "dram"
    # without verification the damaged bytes load (the caller asked for no checks)
    out = load_state_dict(bad, verify=False)
    ref = read_state_dict(good)
    assert any(not torch.equal(out[k], ref[k]) for k in ref)


def test_corrupt_chunk_in_a_sharded_load(make_checkpoint, tmp_path):
    good = make_checkpoint(model_tensors(2))
    bad = tmp_path / "bad"
    corrupt(good, bad, 0, 3)
    with pytest.raises(CorruptChunkError, match="chunk 3"):
        load_state_dict(bad, tp_rank=0, tp_size=2, shard_plan={"embed": 1}, threads=4, chunk_mb=0.05)


def test_re_converted_checkpoint_is_not_served_stale(make_checkpoint, tmp_path):
    pool = DramPool(64 << 20, pin=False)
    path = make_checkpoint(model_tensors(0), root=tmp_path, name="m")
    load_state_dict(path, pool=pool)
    shutil.rmtree(path)
    make_checkpoint(model_tensors(9), root=tmp_path, name="m")
    out = load_state_dict(path, pool=pool)
    assert last_load_stats().tier == "disk"
    assert_same(out, read_state_dict(path))


def test_prefetch_fills_the_pool(make_checkpoint):
    ckpt = make_checkpoint(model_tensors(3))
    pool = DramPool(64 << 20, pin=False)
    stats = pool.prefetch(ckpt, threads=2)
    assert stats.tier == "disk" and ckpt in pool
    gc.collect()
    assert not pool.contents()[0].in_use
    load_state_dict(ckpt, pool=pool)
    assert last_load_stats().tier == "dram"
    assert pool.evict(ckpt) and not pool.evict(ckpt)
    pool.clear()
    assert pool.used_bytes == 0 and pool.spare_bytes == 0


def test_bad_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity_bytes"):
        DramPool(-1)
