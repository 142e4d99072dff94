"""ember.loader.load_state_dict on CPU: bit-exact against the reference reader, for every dtype."""

from __future__ import annotations

import pytest
import torch

from ember.ckpt_format.reader import read_state_dict
from ember.loader import (
    BandwidthTracker,
    LoaderError,
    last_load_stats,
    load_state_dict,
)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    t: dict[str, torch.Tensor] = {
        "f32": torch.randn(257, 129, generator=g),
        "f64": torch.randn(33, 17, generator=g, dtype=torch.float64),
        "f16": torch.randn(1000, 31, generator=g).half(),
        "bf16": torch.randn(513, 64, generator=g).bfloat16(),
        "c64": torch.randn(45, 9, generator=g, dtype=torch.complex64),
        "c128": torch.randn(12, 5, generator=g, dtype=torch.complex128),
        "i8": torch.randint(-128, 127, (4099,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (77, 3), generator=g, dtype=torch.uint8),
        "i16": torch.randint(-3000, 3000, (123,), generator=g, dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5, 7, 11), generator=g, dtype=torch.int32),
        "i64": torch.randint(-(2**62), 2**62, (999,), generator=g, dtype=torch.int64),
        "u16": torch.randint(0, 2**16 - 1, (300,), generator=g, dtype=torch.int32).to(torch.uint16),
        "u32": torch.randint(0, 2**31 - 1, (300,), generator=g, dtype=torch.int64).to(torch.uint32),
        "u64": torch.randint(0, 2**62, (300,), generator=g, dtype=torch.int64).to(torch.uint64),
        "b": torch.rand(1001, generator=g) > 0.5,
        "f8e4": torch.randn(640, generator=g).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(640, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 8),
        "empty_i": torch.empty(3, 0, dtype=torch.int64),
    }
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bytes(a.contiguous().view(-1).view(torch.uint8).numpy()) == bytes(b.contiguous().view(-1).view(torch.uint8).numpy())


@pytest.mark.parametrize("partitions", [1, 3])
@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(("threads", "chunk_mb"), [(1, 0.02), (4, 0.05), (8, 1)])
def test_bit_exact_all_dtypes(make_checkpoint, partitions, verify, threads, chunk_mb):
    ckpt = make_checkpoint(all_dtype_tensors(), partitions=partitions)
    ref = read_state_dict(ckpt)
    out = load_state_dict(ckpt, threads=threads, chunk_mb=chunk_mb, verify=verify)
    assert out.keys() == ref.keys()
    for name in ref:
        assert same_bits(out[name], ref[name]), name
        assert out[name].device.type == "cpu"
    stats = last_load_stats()
    assert stats is not None and stats.tier == "disk" and stats.verify is verify
    assert stats.threads == threads
    assert stats.chunk_bytes % (16 << 10) == 0  # rounded to whole checksum chunks
    assert stats.nbytes == sum(p.stat().st_size for p in ckpt.glob("part-*.bin"))


def test_aliases_are_the_same_tensor(make_checkpoint):
    w = torch.randn(64, 32)
    ckpt = make_checkpoint({"embed.weight": w, "head.weight": w, "other": torch.ones(3)})
    ref = read_state_dict(ckpt)
    out = load_state_dict(ckpt)
    assert ref.keys() == out.keys()
    for name in ref:
        assert same_bits(out[name], ref[name])
    assert out["embed.weight"] is out["head.weight"]


def test_direct_io_used_on_a_disk_filesystem(make_checkpoint):
    ckpt = make_checkpoint({"x": torch.randn(4096, 16)})
    load_state_dict(ckpt)
    stats = last_load_stats()
    fs = _fs_type(ckpt)
    if fs in ("tmpfs", "ramfs", "overlay", "fuse"):
        pytest.skip(f"test directory is on {fs}, which may refuse O_DIRECT")
    assert stats.direct_io is True and stats.fallback_reason is None


def _fs_type(path) -> str:
    best, fs = "", ""
    for line in open("/proc/mounts", encoding="utf-8"):
        parts = line.split()
        mnt = parts[1]
        if str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt:
            if len(mnt) > len(best):
                best, fs = mnt, parts[2]
    return fs


def test_tracker_records_bandwidth(make_checkpoint):
    ckpt = make_checkpoint({"x": torch.randn(4096, 64)})
    tracker = BandwidthTracker(alpha=0.5, min_bytes=0)
    load_state_dict(ckpt, tracker=tracker)
    first = last_load_stats().gbps
    assert tracker.gbps("disk") == pytest.approx(first)
    load_state_dict(ckpt, tracker=tracker)
    second = last_load_stats().gbps
    assert tracker.gbps("disk") == pytest.approx(first + 0.5 * (second - first))
    assert tracker.samples("disk") == 2 and tracker.gbps("dram") is None


def test_last_load_stats_is_per_thread(make_checkpoint):
    import threading

    ckpt = make_checkpoint({"x": torch.randn(100, 10)})
    load_state_dict(ckpt)
    seen = []
    t = threading.Thread(target=lambda: seen.append(last_load_stats()))
    t.start()
    t.join()
    assert seen == [None]
    assert last_load_stats() is not None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": "4"}, "threads"),
        ({"chunk_mb": 0}, "chunk_mb"),
        ({"tp_size": 0}, "tp_size"),
        ({"tp_rank": 2, "tp_size": 2}, "tp_rank"),
        ({"device": "mps"}, "unsupported device"),
        ({"device": "not-a-device"}, "unknown device"),
        ({"verify": "yes"}, "verify"),
    ],
)
def test_bad_options_are_clear_errors(make_checkpoint, kwargs, needle):
    ckpt = make_checkpoint({"x": torch.ones(4)})
    with pytest.raises(LoaderError, match=needle):
        load_state_dict(ckpt, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(make_checkpoint):
    ckpt = make_checkpoint({"x": torch.ones(4)})
    with pytest.raises(LoaderError, match="CUDA is not available"):
        load_state_dict(ckpt, "cuda")


def test_env_overrides_defaults(make_checkpoint, monkeypatch):
    ckpt = make_checkpoint({"x": torch.randn(4096, 16)})
    monkeypatch.setenv("EMBER_LOADER_THREADS", "3")
    monkeypatch.setenv("EMBER_LOADER_CHUNK_MB", "1")
    load_state_dict(ckpt)
    assert last_load_stats().threads == 3 and last_load_stats().chunk_bytes == 1 << 20
    monkeypatch.setenv("EMBER_LOADER_THREADS", "many")
    with pytest.raises(LoaderError, match="EMBER_LOADER_THREADS"):
        load_state_dict(ckpt)


def test_default_read_size_depends_on_the_destination(make_checkpoint, monkeypatch):
    from ember.loader.settings import resolve_io_settings

    monkeypatch.delenv("EMBER_LOADER_CHUNK_MB", raising=False)
    monkeypatch.delenv("EMBER_LOADER_THREADS", raising=False)
    four_mib = 4 << 20
    assert resolve_io_settings(None, None, four_mib, "cpu").chunk_bytes == 64 << 20
    assert resolve_io_settings(None, None, four_mib, "cuda").chunk_bytes == 16 << 20
    load_state_dict(make_checkpoint({"x": torch.randn(64, 16)}))
    assert last_load_stats().chunk_bytes % (64 << 20) == 0
