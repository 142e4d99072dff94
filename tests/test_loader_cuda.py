"""The CUDA paths: pinned ring + copy stream, pool-staged loads, DRAM -> GPU, sharded gathers."""

from __future__ import annotations

import gc

import pytest
import torch

from ember.ckpt_format.reader import read_state_dict
from ember.loader import DramPool, InsufficientMemoryError, last_load_stats, load_model, load_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(2048, 300, generator=g).bfloat16(),
        "w": torch.randn(517, 1001, generator=g),
        "i": torch.randint(0, 10**6, (12345,), generator=g),
        "b": torch.rand(333, generator=g) > 0.5,
        "s": torch.tensor(3.0, dtype=torch.float16),
        "e": torch.empty(0, 4),
    }


def check_on_gpu(out, ref):
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k].device.type == "cuda", k
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        assert torch.equal(out[k].cpu(), ref[k]), k


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("threads", [1, 4])
def test_disk_to_gpu_through_a_small_ring(make_checkpoint, verify, threads):
    ckpt = make_checkpoint(tensors(), partitions=2)
    # a 32 KiB read size and threads + 2 slots: the model is far bigger than the ring
    out = load_state_dict(ckpt, "cuda", chunk_mb=0.03, threads=threads, verify=verify)
    check_on_gpu(out, read_state_dict(ckpt))
    stats = last_load_stats()
    assert stats.tier == "disk" and stats.device.startswith("cuda")


def test_pool_staged_load_then_dram_hit(make_checkpoint):
    ckpt = make_checkpoint(tensors(1), partitions=2)
    ref = read_state_dict(ckpt)
    pool = DramPool(256 << 20)
    assert pool.pin  # CUDA present: pooled buffers are page-locked
    check_on_gpu(load_state_dict(ckpt, "cuda", pool=pool, chunk_mb=0.05), ref)
    assert ckpt in pool
    check_on_gpu(load_state_dict(ckpt, "cuda", pool=pool), ref)
    assert last_load_stats().tier == "dram" and not last_load_stats().zero_copy
    # the pooled (pinned) copy also serves CPU loads, zero-copy
    cpu = load_state_dict(ckpt, "cpu", pool=pool)
    assert last_load_stats().zero_copy
    for k in ref:
        assert torch.equal(cpu[k], ref[k])
    del cpu
    gc.collect()
    pool.clear()


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("from_pool", [False, True])
def test_sharded_on_gpu(make_checkpoint, k, from_pool):
    ckpt = make_checkpoint(tensors(2), partitions=2)
    ref = read_state_dict(ckpt)
    plan = {"embed": 0, "w": 1, "i": 0}
    pool = DramPool(256 << 20) if from_pool else None
    if pool is not None:
        load_state_dict(ckpt, "cpu", pool=pool)
    for r in range(k):
        out = load_state_dict(ckpt, "cuda", tp_rank=r, tp_size=k, shard_plan=plan, pool=pool, chunk_mb=0.05)
        for name, full in ref.items():
            want = torch.chunk(full, k, plan[name])[r] if name in plan else full
            assert torch.equal(out[name].cpu(), want), (name, r)


def test_gpu_out_of_memory_is_reported_before_reading(make_sparse_checkpoint):
    total = torch.cuda.get_device_properties(0).total_memory
    ckpt = make_sparse_checkpoint(total + (1 << 30))
    with pytest.raises(InsufficientMemoryError, match="memory on cuda"):
        load_state_dict(ckpt, "cuda")


def test_load_model_on_gpu_matches_from_pretrained(demo_hf_dir, demo_checkpoint):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(demo_hf_dir, device_map="cuda").eval()
    model = load_model(demo_checkpoint, "cuda")
    ids = torch.randint(0, ref.config.vocab_size, (2, 17), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


def test_recycled_pinned_buffers_with_another_read_size(make_checkpoint):
    a, b = make_checkpoint(tensors(3)), make_checkpoint(tensors(4))  # same shapes: same partition sizes
    size = sum(p.stat().st_size for p in a.glob("part-*.bin"))
    pool = DramPool(size + (1 << 20))
    check_on_gpu(load_state_dict(a, "cuda", pool=pool, chunk_mb=0.05), read_state_dict(a))
    gc.collect()
    assert pool.evict(a) and pool.spare_bytes == size
    # the spare was page-locked in 48 KiB pieces; this fill locks 96 KiB pieces over it
    ref_b = read_state_dict(b)
    check_on_gpu(load_state_dict(b, "cuda", pool=pool, chunk_mb=0.1), ref_b)
    assert pool.spare_bytes == 0
    check_on_gpu(load_state_dict(b, "cuda", pool=pool), ref_b)
    assert last_load_stats().tier == "dram"
