"""Direct I/O fallback on tmpfs, memory checks before reading, and the read plumbing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from ember.ckpt_format.reader import read_state_dict
from ember.loader import InsufficientMemoryError, last_load_stats, load_state_dict
from ember.loader.direct_io import open_partition
from ember.loader.hostmem import HostBuffer, available_host_memory, free_page_reporting


def fs_type(path: Path) -> str:
    best, fs = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mnt = parts[1]
        if str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/"):
            if len(mnt) > len(best):
                best, fs = mnt, parts[2]
    return fs


@pytest.fixture
def shm_dir():
    root = Path("/dev/shm")
    if not root.is_dir() or fs_type(root) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs on this machine")
    path = root / f"ember-loader-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def refuses_o_direct(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return True
    finally:
        probe.unlink()
    os.close(fd)
    return False


def test_tmpfs_load(make_checkpoint, shm_dir, caplog):
    """tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either way the load is
    bit-exact, and the stats and the log say which way it went."""
    src = make_checkpoint({"w": torch.randn(3000, 100), "b": torch.arange(10)}, partitions=2)
    ckpt = shm_dir / "ckpt"
    shutil.copytree(src, ckpt)
    refused = refuses_o_direct(shm_dir)
    with caplog.at_level(logging.WARNING, logger="ember.loader"):
        out = load_state_dict(ckpt, threads=3, chunk_mb=0.05)
    ref = read_state_dict(ckpt)
    for k in ref:
        assert torch.equal(out[k], ref[k])
    stats = last_load_stats()
    lines = [r.getMessage() for r in caplog.records if "direct I/O not used" in r.getMessage()]
    if refused:
        assert stats.direct_io is False and "O_DIRECT refused" in stats.fallback_reason
        assert len(lines) == 1 and str(ckpt) in lines[0]
    else:
        assert stats.direct_io is True and stats.fallback_reason is None and not lines


FALLBACK_SCRIPT = """
import json, logging, sys
from ember.ckpt_format.reader import read_state_dict
from ember.loader import load_state_dict, last_load_stats
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
path = sys.argv[1]
out = load_state_dict(path, threads=3, chunk_mb=0.05)
ref = read_state_dict(path)
same = all(out[k].equal(ref[k]) for k in ref) and out.keys() == ref.keys()
s = last_load_stats()
print(json.dumps({"same": same, "direct_io": s.direct_io, "reason": s.fallback_reason}))
"""


def test_filesystem_refusing_o_direct_falls_back_and_says_why_once(make_checkpoint, tmp_path):
    """ramfs refuses O_DIRECT on every kernel: mounted in a private mount namespace (root only)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a ramfs in a private mount namespace")
    src = make_checkpoint({"w": torch.randn(3000, 100), "b": torch.arange(10)}, partitions=2)
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    script = tmp_path / "load.py"
    script.write_text(FALLBACK_SCRIPT)
    cmd = (
        f"mount -t ramfs none {mnt} && cp -r {src} {mnt}/ckpt && "
        f"{sys.executable} {script} {mnt}/ckpt"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "load_state_dict" not in proc.stderr:
        pytest.skip(f"cannot mount a ramfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"same": True, "direct_io": False, "reason": result["reason"]}
    assert "O_DIRECT refused" in result["reason"]
    lines = [line for line in proc.stderr.splitlines() if "direct I/O not used" in line]
    assert len(lines) == 1, proc.stderr
    assert f"{mnt}/ckpt" in lines[0] and "O_DIRECT refused" in lines[0]


def test_open_partition_reports_mode(make_checkpoint):
    src = make_checkpoint({"w": torch.randn(100)})
    part = src / "part-00000.bin"
    f = open_partition(part)
    try:
        assert f.direct is not refuses_o_direct(src)
    finally:
        f.close()
    g = open_partition(part, direct=False)
    try:
        assert not g.direct and g.fallback_reason == "direct I/O disabled"
        buf = HostBuffer(4096)
        g.read_into(buf.view(), 0)
        assert bytes(buf.view()) == part.read_bytes()[:4096]
    finally:
        g.close()


def test_out_of_memory_is_reported_before_reading(make_sparse_checkpoint):
    ckpt = make_sparse_checkpoint(available_host_memory() * 2)
    with pytest.raises(InsufficientMemoryError) as info:
        load_state_dict(ckpt)
    err = info.value
    assert err.needed > err.available and "host memory" in str(err) and err.hint
    # sharded loads check the rank's share too
    with pytest.raises(InsufficientMemoryError):
        load_state_dict(ckpt, tp_rank=0, tp_size=2, shard_plan={"huge": 0})


def test_host_buffer_is_page_aligned_and_prefaults():
    buf = HostBuffer(3 * 4096 + 5)
    assert buf.address % 4096 == 0
    buf.prepare(0, buf.nbytes)  # faults the pages in; contents are zero
    assert bytes(buf.view(0, 16)) == b"\0" * 16
    buf.view(4096, 4100)[:] = b"abcd"
    assert bytes(buf.tensor[4096:4100].numpy()) == b"abcd"
    assert buf.tensor.numel() == 3 * 4096 + 5
    assert list(buf.pinned_pieces(0, buf.nbytes)) == [(0, buf.nbytes)]


def _vma_flags(address: int) -> str:
    """The VmFlags line of the mapping holding `address`, from /proc/self/smaps."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= address < hi
        elif current and line.startswith("VmFlags:"):
            return line
    raise AssertionError(f"no mapping holds {address:#x}")


def test_huge_pages_follow_the_host_and_the_setting(monkeypatch):
    monkeypatch.setenv("EMBER_LOADER_HUGEPAGES", "1")
    big = HostBuffer(5 << 20)
    assert big.address % (2 << 20) == 0
    assert " hg" in _vma_flags(big.address)  # MADV_HUGEPAGE took
    big.view(big.nbytes - 4, big.nbytes)[:] = b"tail"
    assert bytes(big.tensor[-4:].numpy()) == b"tail"
    assert " hg" not in _vma_flags(HostBuffer(64 << 10).address)  # under one huge page: plain pages
    monkeypatch.setenv("EMBER_LOADER_HUGEPAGES", "0")
    assert " hg" not in _vma_flags(HostBuffer(5 << 20).address)
    monkeypatch.delenv("EMBER_LOADER_HUGEPAGES")  # the default: huge pages unless the host reclaims freed memory
    wanted = not free_page_reporting()
    assert (" hg" in _vma_flags(HostBuffer(5 << 20).address)) is wanted


def _virtio_device(root: Path, name: str, device: int, features: str) -> None:
    (root / name).mkdir()
    (root / name / "device").write_text(f"0x{device:04x}\n")
    (root / name / "features").write_text(features + "\n")


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path):
    assert not free_page_reporting(str(tmp_path / "absent"))
    _virtio_device(tmp_path, "virtio0", 0x0002, "0000011" + "0" * 57)  # a disk: bit 5 means nothing
    assert not free_page_reporting(str(tmp_path))
    _virtio_device(tmp_path, "virtio1", 0x0005, "0110000" + "0" * 57)  # balloon without reporting
    assert not free_page_reporting(str(tmp_path))
    _virtio_device(tmp_path, "virtio2", 0x0005, "0110010" + "0" * 57)  # bit 5: free page reporting
    assert free_page_reporting(str(tmp_path))
