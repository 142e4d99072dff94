"""Wire framing of KV cache blocks for live migration (ember.v1.Worker/MigrateIn).

A request's KV cache is, per layer, a keys and a values tensor of shape
[num_kv_heads, tokens, head_dim]. On the wire it travels as KVBlocks: one layer's keys and
values for a range of token positions, as the raw little-endian bytes of C-contiguous tensors
with their dtype and shape in the block's header, so every block is readable on its own and
nothing but torch is needed to turn it back into tensors. Blocks are packed into KVChunk
messages of about CHUNK_BYTES, far below gRPC's 4 MiB message limit, so a long context streams
as many messages and gRPC's flow control paces the sender.

Multi-stage migration sends the prefix computed so far while the request keeps decoding, then
only the positions added since (each KVState export names its first position), so blocks of
a layer arrive in position order with no gaps and the receiver writes each one straight into
a preallocated buffer; joining the stages costs no extra copy when the request resumes.

torch is imported inside functions: the controller imports this package (cost model) without
the worker extra.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ember.api import worker_pb2 as pb

if TYPE_CHECKING:
    import torch

#: Target size of one KVChunk message (keys + values bytes of its blocks).
CHUNK_BYTES = 1 << 20
#: Dtypes a KV cache may have on the wire (torch names).
KV_DTYPES = ("float32", "float16", "bfloat16", "float64")


class ProtocolError(ValueError):
    """A migration message that does not fit the stream so far; the message says what is wrong."""


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in KV_DTYPES:
        raise ProtocolError(f"KV dtype {name!r} is not one of {', '.join(KV_DTYPES)}")
    return getattr(torch, name)


def _raw_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes()


def encode_kv(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    start: int,
    *,
    round_end: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.KVChunk]:
    """KV positions [start, start + tokens) of every layer as KVChunk messages, in order.

    A chunk holds at most chunk_bytes of tensor data (unless one token of one layer is larger).
    keys[l] / values[l] are CPU tensors [num_kv_heads, tokens, head_dim]. The last chunk carries
    `round_end` (an empty chunk when there is nothing to send, so the receiver still answers).
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    blocks: list[pb.KVBlock] = []
    size = 0
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        heads, tokens, dim = k.shape
        if tuple(v.shape) != tuple(k.shape):
            raise ProtocolError(f"layer {layer}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
        per_token = 2 * heads * dim * k.element_size()
        step = max(1, chunk_bytes // max(per_token, 1))
        dtype = str(k.dtype).removeprefix("torch.")
        for first in range(0, tokens, step):
            count = min(step, tokens - first)
            if blocks and size + count * per_token > chunk_bytes:
                yield pb.KVChunk(blocks=blocks)
                blocks, size = [], 0
            blocks.append(
                pb.KVBlock(
                    layer=layer,
                    token_start=start + first,
                    token_count=count,
                    dtype=dtype,
                    shape=[heads, count, dim],
                    keys=_raw_bytes(k[:, first : first + count]),
                    values=_raw_bytes(v[:, first : first + count]),
                )
            )
            size += count * per_token
    if blocks or round_end:
        yield pb.KVChunk(blocks=blocks, round_end=round_end)


def chunk_nbytes(chunk: pb.KVChunk) -> int:
    return sum(len(b.keys) + len(b.values) for b in chunk.blocks)


def layout_proto(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str) -> pb.KVLayout:
    return pb.KVLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)


def check_layout(layout: pb.KVLayout) -> None:
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        if getattr(layout, name) <= 0:
            raise ProtocolError(f"KV layout {name} must be > 0, got {getattr(layout, name)}")
    torch_dtype(layout.dtype)


def layouts_differ(a: pb.KVLayout, b: pb.KVLayout) -> str | None:
    """What differs between two layouts (None when they match), for a refusal message."""
    diffs = [
        f"{name} {getattr(a, name)} vs {getattr(b, name)}"
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype")
        if getattr(a, name) != getattr(b, name)
    ]
    return ", ".join(diffs) or None


class KVAssembler:
    """Receives the blocks of one request into preallocated per-layer buffers.

    Each layer fills from position 0 upwards; a block must start where that layer's data ends
    (the sender sends stages in order), so gaps and overlaps are refused, never silently kept.
    """

    def __init__(self, layout: pb.KVLayout, capacity: int) -> None:
        import torch

        check_layout(layout)
        if capacity <= 0:
            raise ProtocolError(f"KV capacity must be > 0 tokens, got {capacity}")
        self.layout = layout
        self.capacity = capacity
        self._dtype = torch_dtype(layout.dtype)
        self._itemsize = torch.empty((), dtype=self._dtype).element_size()
        shape = (layout.num_kv_heads, capacity, layout.head_dim)
        self._keys = [torch.empty(shape, dtype=self._dtype) for _ in range(layout.num_layers)]
        self._values = [torch.empty(shape, dtype=self._dtype) for _ in range(layout.num_layers)]
        self._filled = [0] * layout.num_layers
        self.bytes_received = 0

    @property
    def tokens(self) -> int:
        """Positions held by every layer, from 0."""
        return min(self._filled)

    def add(self, chunk: pb.KVChunk) -> None:
        for block in chunk.blocks:
            self._add_block(block)

    def _add_block(self, block: pb.KVBlock) -> None:
        lay = self.layout
        if not 0 <= block.layer < lay.num_layers:
            raise ProtocolError(f"KV block for layer {block.layer}; the model has {lay.num_layers} layers")
        if block.dtype != lay.dtype:
            raise ProtocolError(f"KV block dtype {block.dtype!r}; the layout says {lay.dtype!r}")
        expected_shape = [lay.num_kv_heads, block.token_count, lay.head_dim]
        if list(block.shape) != expected_shape or block.token_count <= 0:
            raise ProtocolError(f"KV block shape {list(block.shape)}; expected {expected_shape} with tokens > 0")
        filled = self._filled[block.layer]
        if block.token_start != filled:
            raise ProtocolError(
                f"KV block of layer {block.layer} starts at token {block.token_start}; "
                f"that layer holds tokens [0, {filled}) (blocks must arrive in order without gaps)"
            )
        end = block.token_start + block.token_count
        if end > self.capacity:
            raise ProtocolError(f"KV block ends at token {end}, beyond the announced capacity {self.capacity}")
        nbytes = block.token_count * lay.num_kv_heads * lay.head_dim * self._itemsize
        if len(block.keys) != nbytes or len(block.values) != nbytes:
            raise ProtocolError(
                f"KV block of layer {block.layer} has {len(block.keys)} key / {len(block.values)} value bytes; "
                f"its shape needs {nbytes}"
            )
        for target, data in ((self._keys, block.keys), (self._values, block.values)):
            target[block.layer][:, block.token_start : end].copy_(self._tensor(data, expected_shape))
        self._filled[block.layer] = end
        self.bytes_received += 2 * nbytes

    def _tensor(self, data: bytes, shape: list[int]) -> torch.Tensor:
        import torch

        with warnings.catch_warnings():  # read-only bytes: we only copy out of the view
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=torch.uint8).view(self._dtype).view(shape)

    def tensors(self, num_tokens: int) -> tuple[list[Any], list[Any]]:
        """Keys and values for positions [0, num_tokens): views of the buffers, no copy."""
        if any(f != num_tokens for f in self._filled):
            held = sorted(set(self._filled))
            raise ProtocolError(
                f"the commit says the KV covers {num_tokens} tokens but the layers hold {held} tokens"
            )
        return [k[:, :num_tokens] for k in self._keys], [v[:, :num_tokens] for v in self._values]
