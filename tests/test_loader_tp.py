"""Tensor-parallel loads from one checkpoint: each rank's tensors equal torch.chunk(full, k, dim)[r]."""

from __future__ import annotations

import pytest
import torch

from ember.ckpt_format.reader import read_state_dict
from ember.loader import (
    LLAMA_SHARD_PLAN,
    DramPool,
    ShardPlanError,
    chunk_bounds,
    last_load_stats,
    load_state_dict,
)
from ember.loader.plan import shard_slices, sharded_plan
from ember.ckpt_format.index import open_checkpoint

PLAN = {"row.*": 0, "col.*": 1, "mid.*": 1, "last": -1}


def tp_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        # row widths that are not multiples of the 16 KiB checksum chunk, so rows straddle reads
        "row.even": torch.randn(64, 1001, generator=g),
        "row.odd": torch.randn(37, 515, generator=g).bfloat16(),
        "row.vec": torch.randint(0, 1000, (4099,), generator=g),
        "col.even": torch.randn(513, 256, generator=g),
        "col.odd": torch.randn(129, 37, generator=g).half(),
        "col.big": torch.randn(300, 2000, generator=g),
        "mid.3d": torch.randn(5, 16, 77, generator=g),
        "last": torch.randn(33, 23, generator=g),
        "replicated": torch.randn(100, 3, generator=g),
        "scalar": torch.tensor(1.0),
        "row.empty": torch.empty(0, 4),
        "empty": torch.empty(3, 0, dtype=torch.int32),
    }


def expected(ref: torch.Tensor, name: str, k: int, r: int) -> torch.Tensor:
    for pattern, dim in PLAN.items():
        import fnmatch

        if fnmatch.fnmatchcase(name, pattern):
            return torch.chunk(ref, k, dim)[r]
    return ref


@pytest.fixture(scope="module")
def tp_ckpt(tmp_path_factory):
    from ember.ckpt_format.writer import convert

    base = tmp_path_factory.mktemp("tp")
    torch.save(tp_tensors(), base / "src.pt")
    return convert(base / "src.pt", base / "ckpt", 2, chunk_bytes=16 << 10).path


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("verify", [True, False])
def test_slices_equal_torch_chunk(tp_ckpt, k, verify):
    ref = read_state_dict(tp_ckpt)
    for r in range(k):
        out = load_state_dict(tp_ckpt, tp_rank=r, tp_size=k, shard_plan=PLAN, verify=verify, chunk_mb=0.05, threads=3)
        assert out.keys() == ref.keys()
        for name, full in ref.items():
            want = expected(full, name, k, r)
            assert out[name].shape == want.shape, (name, k, r)
            assert out[name].is_contiguous()
            assert torch.equal(out[name], want), (name, k, r)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_slices_from_the_dram_pool(tp_ckpt, k):
    ref = read_state_dict(tp_ckpt)
    pool = DramPool(1 << 30, pin=False)
    load_state_dict(tp_ckpt, pool=pool)  # fills the pool
    for r in range(k):
        out = load_state_dict(tp_ckpt, tp_rank=r, tp_size=k, shard_plan=PLAN, pool=pool)
        assert last_load_stats().tier == "dram"
        for name, full in ref.items():
            assert torch.equal(out[name], expected(full, name, k, r)), (name, k, r)


@pytest.mark.parametrize("verify", [True, False])
def test_sharded_load_reads_only_the_ranks_bytes(make_checkpoint, verify):
    big = torch.randn(2048, 1024)  # 8 MiB, split 8 ways: 1 MiB per rank
    ckpt = make_checkpoint({"a.big": big, "norm": torch.randn(1024)})
    out = load_state_dict(ckpt, tp_rank=3, tp_size=8, shard_plan={"*.big": 0}, verify=verify)
    assert torch.equal(out["a.big"], torch.chunk(big, 8, 0)[3])
    read = last_load_stats().nbytes
    granule = (16 << 10) if verify else 4096
    # the rank's MiB, widened by at most one granule at each end, plus the replicated norm
    assert read <= (1 << 20) + 2 * granule + granule
    assert read < open_checkpoint(ckpt).total_bytes / 6


def test_plan_merges_and_covers_needed_bytes(tp_ckpt):
    index = open_checkpoint(tp_ckpt)
    slices = shard_slices(index, PLAN, 1, 4)
    plan = sharded_plan(index, slices, chunk_bytes=32 << 10, verify=True)
    for job in plan.jobs:
        assert job.start % index.chunk_bytes == 0  # whole checksum chunks only
        assert job.nbytes <= 32 << 10
    for i, item in enumerate(plan.items):
        covered = sum(
            min(j.end, item.need_end) - max(j.start, item.need_start)
            for j in plan.jobs
            if i in j.items
        )
        assert covered == item.need_end - item.need_start


@pytest.mark.parametrize("n", [0, 1, 3, 5, 7, 8, 9, 1000])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_chunk_bounds_match_torch_chunk(n, k):
    pieces = torch.chunk(torch.arange(n), k)
    for r in range(k):
        bounds = chunk_bounds(n, k, r)
        if r < len(pieces):
            a, b = bounds
            assert torch.equal(torch.arange(n)[a:b], pieces[r])
        else:
            assert bounds is None


def test_rank_without_a_piece_is_a_clear_error(make_checkpoint):
    ckpt = make_checkpoint({"w": torch.randn(5, 4)})
    # torch.chunk(range(5), 4) has 3 pieces: rank 3 has none
    with pytest.raises(ShardPlanError, match="only 3 pieces"):
        load_state_dict(ckpt, tp_rank=3, tp_size=4, shard_plan={"w": 0})


def test_plan_dim_out_of_range_is_a_clear_error(make_checkpoint):
    ckpt = make_checkpoint({"v": torch.randn(8)})
    with pytest.raises(ShardPlanError, match="dim 1"):
        load_state_dict(ckpt, tp_rank=0, tp_size=2, shard_plan={"v": 1})


def test_llama_plan_on_the_demo_model(demo_checkpoint):
    ref = read_state_dict(demo_checkpoint)
    dims = {
        "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0, "gate_proj.weight": 0,
        "up_proj.weight": 0, "o_proj.weight": 1, "down_proj.weight": 1,
        "embed_tokens.weight": 0, "lm_head.weight": 0,
    }
    for r in range(2):
        out = load_state_dict(demo_checkpoint, tp_rank=r, tp_size=2, shard_plan=LLAMA_SHARD_PLAN)
        for name, full in ref.items():
            dim = next((d for suffix, d in dims.items() if name.endswith(suffix)), None)
            want = full if dim is None else torch.chunk(full, 2, dim)[r]
            assert torch.equal(out[name], want), name
        assert out["model.norm.weight"].shape == ref["model.norm.weight"].shape


def test_tied_alias_gets_the_same_slice(make_checkpoint):
    w = torch.randn(50, 8)
    ckpt = make_checkpoint({"model.embed_tokens.weight": w, "lm_head.weight": w})
    out = load_state_dict(ckpt, tp_rank=1, tp_size=2, shard_plan=LLAMA_SHARD_PLAN)
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
    assert torch.equal(out["lm_head.weight"], torch.chunk(w, 2, 0)[1])
