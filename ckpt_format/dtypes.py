"""Mapping between format dtype names and torch dtypes (imports torch: worker side only)."""

from __future__ import annotations

import torch

from ember.ckpt_format import spec

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in spec.DTYPE_ITEMSIZE}
DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}


def to_torch(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str | None:
    """The format's name for a torch dtype, or None when format v1 cannot store it."""
    return DTYPE_NAMES.get(dtype)
