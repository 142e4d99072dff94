"""Tensor parallelism from one checkpoint: which slice of each tensor a rank gets.

A shard plan maps name patterns (shell globs, first match wins) to the dimension that is split
across ranks, or None for a tensor every rank holds whole; names no pattern matches are
replicated. A rank's slice of a tensor split along `dim` is exactly
`torch.chunk(full, tp_size, dim)[tp_rank]` — same sizes when the dimension does not divide
evenly, and an error when torch.chunk has no piece for that rank.

LLAMA_SHARD_PLAN is Megatron-LM's layout for the Llama family (Llama, Mistral, Qwen2, ...).
nn.Linear stores weight as [out_features, in_features]:
- q/k/v and gate/up projections are column-parallel: each rank computes a slice of the output
  features (whole heads for attention, a slice of the MLP's intermediate size), so weight dim 0 is
  split — and their bias (Qwen2 has q/k/v biases) the same way.
- o_proj and down_proj are row-parallel: each rank consumes the slice of input features the
  column-parallel layer before it produced, so weight dim 1 is split; ranks sum partial outputs
  (all-reduce), which is why a row-parallel bias, if any, stays whole and is added once after it.
- embed_tokens and lm_head are vocab-parallel: split along the vocabulary (dim 0); a backend
  masks out-of-range token ids on the embedding and gathers logits after lm_head. A tied lm_head
  gets the same slice as the embedding, so the tie still holds per rank.
- norms (and everything unmatched) are replicated.
A split of dim 0 is one contiguous byte range in the file; a split of dim 1 is a strided slice.
For attention, a rank gets whole heads only if num_attention_heads and num_key_value_heads are
divisible by tp_size; a backend that needs that should check its config (torch.chunk semantics
are kept regardless, so with GQA and tp_size > num_key_value_heads heads are cut mid-way).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import LoaderError, ShardPlanError

ShardPlan = Mapping[str, "int | None"]

LLAMA_SHARD_PLAN: dict[str, int | None] = {
    "*.self_attn.q_proj.weight": 0,
    "*.self_attn.k_proj.weight": 0,
    "*.self_attn.v_proj.weight": 0,
    "*.self_attn.q_proj.bias": 0,
    "*.self_attn.k_proj.bias": 0,
    "*.self_attn.v_proj.bias": 0,
    "*.self_attn.o_proj.weight": 1,
    "*.self_attn.o_proj.bias": None,
    "*.mlp.gate_proj.weight": 0,
    "*.mlp.up_proj.weight": 0,
    "*.mlp.gate_proj.bias": 0,
    "*.mlp.up_proj.bias": 0,
    "*.mlp.down_proj.weight": 1,
    "*.mlp.down_proj.bias": None,
    "*embed_tokens.weight": 0,
    "lm_head.weight": 0,
    "*norm.weight": None,
    "*norm.bias": None,
}


@dataclass(frozen=True)
class Slice:
    """Rank's part of a tensor: `dim` is None for the whole tensor, else indices [start, stop) of dim."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return shape
        return shape[: self.dim] + (self.stop - self.start,) + shape[self.dim + 1 :]

    def byte_layout(self, shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int, int]:
        """(outer, row_bytes, slice_start_byte, slice_stop_byte) of the tensor seen as [outer, row].

        The slice takes bytes [slice_start_byte, slice_stop_byte) of each of the `outer` rows;
        outer == 1 means the slice is one contiguous byte range.
        """
        if self.dim is None:
            total = math.prod(shape) * itemsize
            return 1, total, 0, total
        outer = math.prod(shape[: self.dim])
        inner = math.prod(shape[self.dim + 1 :]) * itemsize
        return outer, shape[self.dim] * inner, self.start * inner, self.stop * inner

    @property
    def is_whole(self) -> bool:
        return self.dim is None


WHOLE = Slice(None)


def chunk_bounds(n: int, k: int, r: int) -> tuple[int, int] | None:
    """[start, stop) of piece r of `torch.chunk(range(n), k)`, or None if torch.chunk makes no piece r."""
    if n == 0:
        return (0, 0)
    size = -(-n // k)
    if r * size >= n:
        return None
    return r * size, min((r + 1) * size, n)


def validate_tp(tp_rank: int, tp_size: int) -> None:
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise LoaderError(f"tp_size must be a positive integer, got {tp_size!r}")
    if not isinstance(tp_rank, int) or isinstance(tp_rank, bool) or not 0 <= tp_rank < tp_size:
        raise LoaderError(f"tp_rank must be an integer in [0, {tp_size}), got {tp_rank!r}")


def shard_dim(name: str, plan: ShardPlan | None) -> int | None:
    """The plan's split dimension for `name` (first matching pattern), None when replicated."""
    if not plan:
        return None
    for pattern, dim in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return dim
    return None


def slice_for(name: str, shape: tuple[int, ...], plan: ShardPlan | None, tp_rank: int, tp_size: int) -> Slice:
    """The slice of tensor `name` that rank `tp_rank` of `tp_size` loads."""
    if tp_size == 1:
        return WHOLE
    dim = shard_dim(name, plan)
    if dim is None:
        return WHOLE
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise ShardPlanError(f"shard plan gives {name!r} dimension {dim!r}; use an integer or None")
    nd = len(shape)
    if not -nd <= dim < nd:
        raise ShardPlanError(
            f"shard plan splits {name!r} along dim {dim}, but it has shape {list(shape)}",
            "fix the shard plan pattern so it only matches tensors with that dimension",
        )
    dim %= nd
    bounds = chunk_bounds(shape[dim], tp_size, tp_rank)
    if bounds is None:
        pieces = -(-shape[dim] // -(-shape[dim] // tp_size))
        raise ShardPlanError(
            f"{name!r} has size {shape[dim]} along dim {dim}: torch.chunk makes only {pieces} "
            f"pieces for tp_size {tp_size}, so rank {tp_rank} has none",
            "use a smaller tp_size or replicate this tensor in the shard plan",
        )
    return Slice(dim, *bounds)
