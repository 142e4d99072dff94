"""Fast multi-tier loader: direct-I/O reader pool, DRAM pool, tensor materialization into a model.

    from ember.loader import load_state_dict, load_model, DramPool, BandwidthTracker
    pool = DramPool(32 << 30)
    model = load_model("/ckpt/llama", "cuda", pool=pool)          # disk -> GPU, fills the pool
    again = load_model("/ckpt/llama", "cuda", pool=pool)          # DRAM -> GPU, no disk I/O
    shard = load_state_dict("/ckpt/llama", "cuda:1", tp_rank=1, tp_size=2,
                            shard_plan=LLAMA_SHARD_PLAN)          # only rank 1's bytes are read
    last_load_stats().gbps

Importing this package does not import torch; the load functions do.
"""

from __future__ import annotations

from ember.ckpt_format.errors import CheckpointError, CorruptChunkError

from .errors import InsufficientMemoryError, LoaderError, ShardPlanError
from .model import load_model
from .pool import DramPool, PoolEntryInfo
from .settings import DEFAULT_CHUNK_MB, DEFAULT_THREADS
from .state_dict import load_state_dict
from .stats import BandwidthTracker, LoadStats, last_load_stats
from .tp import LLAMA_SHARD_PLAN, chunk_bounds

__all__ = [
    "DEFAULT_CHUNK_MB",
    "DEFAULT_THREADS",
    "LLAMA_SHARD_PLAN",
    "BandwidthTracker",
    "CheckpointError",
    "CorruptChunkError",
    "DramPool",
    "InsufficientMemoryError",
    "LoadStats",
    "LoaderError",
    "PoolEntryInfo",
    "ShardPlanError",
    "chunk_bounds",
    "last_load_stats",
    "load_model",
    "load_state_dict",
]
