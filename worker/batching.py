"""The running batch's KV cache, right-aligned so that one decode forward serves every row.

Rows have different lengths. Each row's tokens fill the *last* `lengths[i]` columns of a
transformers `DynamicCache` (zeros on the left); the decode step passes a 2D attention mask that
hides the padding and per-row position_ids equal to each row's true length, so a row computes
what it would compute alone. The cache grows by one column per decode step for every row at
once. A joining row is left-padded to the batch width (or the batch to the row's width); a
leaving row is dropped with index_select, and columns that became padding for every row are cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PaddedKVBatch:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self._layers[0].keys.shape[-2] if self.lengths else 0

    @property
    def _layers(self) -> list[DynamicLayer]:
        assert self.cache is not None
        return self.cache.layers  # type: ignore[return-value]

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Append one row; keys[l], values[l] are [1, kv_heads, length, head_dim]."""
        length = keys[0].shape[-2]
        if not self.lengths:
            self.cache = DynamicCache(list(zip(keys, values)))
            self.lengths = [length]
            return
        width = self.width
        for layer, k, v in zip(self._layers, keys, values):
            if length > width:
                layer.keys = _left_pad(layer.keys, length - width)
                layer.values = _left_pad(layer.values, length - width)
            layer.keys = torch.cat([layer.keys, _left_pad(k.to(layer.keys.dtype), width - length)])
            layer.values = torch.cat([layer.values, _left_pad(v.to(layer.values.dtype), width - length)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and cut the columns no remaining row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        self.lengths = [self.lengths[i] for i in rows]
        index = torch.tensor(rows, device=self._layers[0].keys.device)
        unused = self.width - max(self.lengths)
        for layer in self._layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, unused:]
            layer.values = layer.values.index_select(0, index)[:, :, unused:]

    def decode_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """attention_mask [rows, width + 1] and position_ids [rows, 1] for a one-token decode step."""
        width = self.width
        lengths = torch.tensor(self.lengths, device=device)
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """The model appended one column for every row."""
        self.lengths = [n + 1 for n in self.lengths]

    def row(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of row i without padding: per layer [kv_heads, length, head_dim]."""
        start = self.width - self.lengths[i]
        keys = [layer.keys[i, :, start:] for layer in self._layers]
        values = [layer.values[i, :, start:] for layer in self._layers]
        return keys, values


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t
