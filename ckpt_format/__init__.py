"""Ember checkpoint format (version 1): spec constants, index model, writer (convert) and reference reader.

Importing this package does not import torch: `convert` and `read_state_dict` load their
modules on first call, so the controller can use the index without the `worker` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.ckpt_format.errors import CheckpointError
from ember.ckpt_format.index import CheckpointIndex, open_checkpoint

if TYPE_CHECKING:
    import os
    from collections.abc import Callable

    import torch


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    partitions: int = 1,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointIndex:
    """Convert a Hugging Face model directory, a .safetensors file or a torch state-dict file
    into an Ember checkpoint at `dst` (see ember.ckpt_format.writer.convert)."""
    from ember.ckpt_format.writer import convert as _convert

    return _convert(src, dst, partitions, overwrite=overwrite, progress=progress)


def read_state_dict(path: str | os.PathLike[str], verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into CPU tensors (see ember.ckpt_format.reader.read_state_dict)."""
    from ember.ckpt_format.reader import read_state_dict as _read

    return _read(path, verify)


__all__ = ["CheckpointError", "CheckpointIndex", "convert", "open_checkpoint", "read_state_dict"]
