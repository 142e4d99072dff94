"""The simulated models: Llama-family shapes and what they cost to hold, load and run.

A model's numbers follow from its shape and the GPU, with simple roofline formulas (modelled,
not measured):
- checkpoint bytes = parameters × 2 (bf16);
- GPUs per instance = ceil(bytes × memory_factor / GPU memory) — the controller's memory
  factor, so the simulated worker and the scheduler agree on what fits;
- prefill time per token = 2 × parameters FLOPs / (GPUs × peak × MFU) (compute-bound);
- decode time per token = bytes / (GPUs × HBM bandwidth × efficiency) (each step reads the
  weights once; batching is ignored, so concurrent requests do not slow each other down);
- KV bytes per token = 2 (K and V) × layers × KV heads × head dim × 2 bytes;
- initialisation = init_s + init_s_per_billion × billions of parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ember.sim.config import SimConfig
from ember.sim.errors import SimConfigError


@dataclass(frozen=True)
class Shape:
    params: float
    layers: int
    kv_heads: int
    head_dim: int


# Public architecture figures of the Llama family (GQA for the 8B, 34B and 70B).
SHAPES: dict[str, Shape] = {
    "7b": Shape(6.74e9, 32, 32, 128),  # Llama-2-7B
    "8b": Shape(8.03e9, 32, 8, 128),  # Llama-3-8B
    "13b": Shape(13.0e9, 40, 40, 128),  # Llama-2-13B
    "34b": Shape(33.7e9, 48, 8, 128),  # CodeLlama-34B
    "70b": Shape(69.0e9, 80, 8, 128),  # Llama-2-70B
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: str
    size_bytes: int
    gpus: int
    kv_bytes_per_token: int
    prefill_s_per_token: float
    decode_s_per_token: float
    init_s: float

    @property
    def uri(self) -> str:
        return f"s3://ember-models/{self.name}"


def model_spec(name: str, shape_name: str, config: SimConfig) -> ModelSpec:
    shape = SHAPES[shape_name]
    gpu, cluster = config.gpu, config.cluster
    size = int(shape.params * 2)
    gpu_bytes = cluster.gpu_memory_gb * 1e9
    gpus = math.ceil(size * config.memory_factor / gpu_bytes)
    if gpus > cluster.gpus_per_node:
        raise SimConfigError(
            f"model {name!r} ({shape_name}, {size / 1e9:.0f} GB) needs {gpus} GPUs of {cluster.gpu_memory_gb:g} GB "
            f"but a node has {cluster.gpus_per_node}",
            "raise cluster.gpus_per_node or cluster.gpu_memory_gb, or drop the shape from models.mix",
        )
    return ModelSpec(
        name=name, shape=shape_name, size_bytes=size, gpus=gpus,
        kv_bytes_per_token=2 * shape.layers * shape.kv_heads * shape.head_dim * 2,
        prefill_s_per_token=2 * shape.params / (gpus * gpu.tflops * 1e12 * gpu.mfu),
        decode_s_per_token=size / (gpus * gpu.hbm_gbps * 1e9 * gpu.hbm_efficiency),
        init_s=config.models.init_s + config.models.init_s_per_billion * shape.params / 1e9,
    )


def build_catalog(config: SimConfig, trace_models: list[str] | None = None) -> list[ModelSpec]:
    """The models of a run, most popular first for a synthetic workload.

    Models listed in models.entries keep their shape; any other model (generated, or named by
    a trace) gets a shape drawn from models.mix with the run's seed."""
    explicit = {m.name: m.shape for m in config.models.entries}
    if trace_models is not None:
        names = list(trace_models)
    elif explicit:
        names = list(explicit)
    else:
        width = max(3, len(str(config.models.count - 1)))
        names = [f"model-{i:0{width}d}" for i in range(config.models.count)]
    shapes = list(config.models.mix)
    weights = np.array([config.models.mix[s] for s in shapes], dtype=float)
    rng = np.random.default_rng([config.seed, 17])
    drawn = rng.choice(len(shapes), size=len(names), p=weights / weights.sum())
    return [model_spec(name, explicit.get(name, shapes[d]), config) for name, d in zip(names, drawn)]
