"""Atomic conversion: a conversion that dies half-way leaves nothing at the destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ember.ckpt_format import convert, open_checkpoint, read_state_dict

# A conversion that reports progress, then stalls mid-way (the progress callback sleeps), so the
# test can kill it while the temp directory holds a partly written partition.
CONVERT_AND_STALL = textwrap.dedent(
    """
    import sys, time
    from ember.ckpt_format.writer import convert
    from ember.ckpt_format import sources
    sources.COPY_BLOCK = 1 << 20
    def progress(done, total):
        if 0 < done < total:
            print("progress", done, total, flush=True)
            time.sleep(600)
    convert(sys.argv[1], sys.argv[2], 2, progress=progress)
    """
)


def temp_dirs(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".ember-tmp-"))


@pytest.fixture
def source(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save({f"w{i}": torch.randn(1 << 20, generator=g) for i in range(4)}, tmp_path / "s.pt")
    return tmp_path / "s.pt"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_conversion_leaves_no_destination(tmp_path, source, sig):
    dst = tmp_path / "out" / "model.ember"
    proc = subprocess.Popen(
        [sys.executable, "-c", CONVERT_AND_STALL, str(source), str(dst)], stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("progress"), line
        leftovers = temp_dirs(dst.parent)
        assert len(leftovers) == 1 and leftovers[0].startswith(".ember-tmp-model.ember.")
        assert (dst.parent / leftovers[0] / "part-00000.bin").exists()
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
    assert not dst.exists()
    with pytest.raises(Exception, match="does not exist"):
        open_checkpoint(dst)
    # the next conversion to the same destination removes the dead one's temp dir
    index = convert(source, dst)
    assert temp_dirs(dst.parent) == []
    assert len(index.tensors) == 4
    assert torch.equal(read_state_dict(dst)["w3"], torch.load(source)["w3"])


def test_failed_conversion_cleans_up(tmp_path, source):
    dst = tmp_path / "model.ember"

    def boom(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, progress=boom)
    assert not dst.exists()
    assert temp_dirs(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, source):
    dst = tmp_path / "model.ember"
    convert(source, dst)
    before = (dst / "ember.json").read_bytes()

    def boom(done, total):
        if done:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        convert(source, dst, 3, overwrite=True, progress=boom)
    assert (dst / "ember.json").read_bytes() == before
    open_checkpoint(dst)
    assert temp_dirs(tmp_path) == []


def test_temp_dir_of_a_live_conversion_is_left_alone(tmp_path, source):
    import socket

    live = tmp_path / f".ember-tmp-model.ember.{socket.gethostname()}.{os.getppid()}.abcd"
    live.mkdir()
    convert(source, tmp_path / "model.ember")
    assert live.exists()
