"""The reference reader: the simplest correct way to read a checkpoint.

It reads each partition with plain buffered reads, verifies every chunk, and builds tensors as
views of the partition's bytes. It is the oracle the fast loader is tested against, so it stays
obvious rather than fast.
"""

from __future__ import annotations

import os

import torch

from ember.ckpt_format.checksum import verify_chunk
from ember.ckpt_format.dtypes import to_torch
from ember.ckpt_format.errors import PartitionSizeError
from ember.ckpt_format.index import RECONVERT_HINT, CheckpointIndex, TensorEntry, open_checkpoint


def read_state_dict(path: str | os.PathLike[str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path` on the CPU, aliases as the same tensor object.

    With `verify` (the default) every chunk's checksum is checked and a mismatch raises
    CorruptChunkError naming the file and chunk.
    """
    index = open_checkpoint(path)
    buffers = [_read_partition(index, p, verify) for p in range(len(index.partitions))]
    state: dict[str, torch.Tensor] = {}
    for name, entry in index.tensors.items():
        state[name] = tensor_from_bytes(entry, buffers[entry.partition])
    for alias, target in index.aliases.items():
        state[alias] = state[target]
    return state


def tensor_from_bytes(entry: TensorEntry, buf: bytearray | memoryview) -> torch.Tensor:
    """A tensor viewing `entry`'s bytes inside its partition buffer (no copy)."""
    dtype = to_torch(entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
    return raw.view(dtype).reshape(entry.shape)


def _read_partition(index: CheckpointIndex, p: int, verify: bool) -> bytearray:
    size = index.partitions[p].size
    buf = bytearray(size)
    view = memoryview(buf)
    file = index.partition_path(p)
    with open(file, "rb") as f:
        for i in range(index.num_chunks(p)):
            start, end = index.chunk_range(p, i)
            n = f.readinto(view[start:end])
            while n < end - start:
                more = f.readinto(view[start + n : end])
                if not more:
                    raise PartitionSizeError(
                        f"partition file {file} ended at byte {start + n}, expected {size} bytes "
                        f"(it was truncated after the checkpoint was opened)",
                        RECONVERT_HINT,
                        file=file,
                    )
                n += more
            if verify:
                verify_chunk(index, p, i, view[start:end])
    return buf
