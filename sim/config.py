"""The simulation's configuration: dataclasses with defaults, read from a YAML file.

Every number here is a modelled parameter, not a measurement of a real cluster: the defaults
describe an 8×80 GB-GPU node class with NVMe and a 100 Gb/s-class network, and the example
config (`ember sim --example-config`) says where each default comes from. A key the file
spells wrong is an error naming the key and the valid ones — a silently ignored typo would
make a simulation answer a different question than the one asked.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.sim.errors import SimConfigError

POLICY_NAMES = ("ember", "ember-no-migration", "serverlessllm", "kserve", "rayserve")
ARRIVALS = ("gamma", "weibull", "mmpp", "poisson")
LENGTH_DISTS = ("zipf", "lognormal", "fixed")


@dataclass
class ClusterConfig:
    nodes: int = 16
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    dram_gb: float = 512.0  # per node: the DRAM checkpoint cache
    disk_gb: float = 2000.0  # per node: the NVMe checkpoint cache
    dram_gbps: float = 20.0  # DRAM -> GPU over PCIe, per node
    disk_gbps: float = 5.0  # NVMe -> GPU, per node
    s3_gbps: float = 1.5  # remote checkpoint store -> node
    network_gbps: float = 12.5  # node -> node (KV migration)
    bandwidth_jitter: float = 0.1  # each node's bandwidths vary by up to ±this fraction (seeded)
    # A cluster that has served before: each checkpoint starts on the disk cache of this many
    # nodes (round-robin from a seeded shuffle), for the policies that keep a disk cache.
    prestaged_disk_copies: int = 1

    def validate(self) -> None:
        _positive_int(self, "cluster", "nodes", "gpus_per_node")
        _positive(self, "cluster", "gpu_memory_gb", "dram_gbps", "disk_gbps", "s3_gbps", "network_gbps")
        _non_negative(self, "cluster", "dram_gb", "disk_gb")
        if not 0 <= self.prestaged_disk_copies <= self.nodes:
            raise SimConfigError(f"cluster.prestaged_disk_copies must be in [0, nodes={self.nodes}], "
                                 f"got {self.prestaged_disk_copies}")
        if not 0 <= self.bandwidth_jitter < 1:
            raise SimConfigError(f"cluster.bandwidth_jitter must be in [0, 1), got {self.bandwidth_jitter}")


@dataclass
class GpuConfig:
    tflops: float = 312.0  # dense bf16 peak (A100-class)
    mfu: float = 0.5  # fraction of peak a prefill reaches
    hbm_gbps: float = 2039.0  # memory bandwidth (A100 80 GB)
    hbm_efficiency: float = 0.6  # fraction of it a decode step reaches (weights read once per token)

    def validate(self) -> None:
        _positive(self, "gpu", "tflops", "hbm_gbps")
        for name in ("mfu", "hbm_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise SimConfigError(f"gpu.{name} must be in (0, 1], got {value}")


@dataclass
class ModelEntry:
    name: str
    shape: str


@dataclass
class ModelsConfig:
    count: int = 100  # generated models (model-000, ...) when the workload is synthetic
    mix: dict[str, float] = field(default_factory=lambda: {"7b": 0.4, "13b": 0.3, "34b": 0.2, "70b": 0.1})
    init_s: float = 2.0  # initialisation after the weights are on the GPU (CUDA graphs, KV cache)
    init_s_per_billion: float = 0.02  # ... plus this per billion parameters
    entries: list[ModelEntry] = field(default_factory=list)  # explicit models (e.g. those of a CSV trace)

    def validate(self) -> None:
        from ember.sim.catalog import SHAPES

        _positive_int(self, "models", "count")
        _non_negative(self, "models", "init_s", "init_s_per_billion")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise SimConfigError("models.mix needs at least one shape with a weight > 0, e.g. {7b: 1}")
        for shape in list(self.mix) + [m.shape for m in self.entries]:
            if shape not in SHAPES:
                raise SimConfigError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
        names = [m.name for m in self.entries]
        if len(set(names)) != len(names):
            raise SimConfigError("models.entries names a model twice; each name must be unique")


@dataclass
class DeploymentConfig:
    """Every model's deployment settings (the controller's DeploymentSettings)."""

    min_instances: int = 0
    max_instances: int = 4
    target_concurrency: int = 8
    keep_alive_s: float = 60.0
    queue_limit: int = 100
    request_timeout_s: float = 300.0

    def validate(self) -> None:
        _positive_int(self, "deployment", "max_instances", "target_concurrency", "queue_limit")
        _positive(self, "deployment", "request_timeout_s")
        _non_negative(self, "deployment", "keep_alive_s")
        if not 0 <= self.min_instances <= self.max_instances:
            raise SimConfigError(f"deployment.min_instances must be in [0, max_instances={self.max_instances}], "
                                 f"got {self.min_instances}")


@dataclass
class TokensConfig:
    dist: str = "lognormal"  # zipf | lognormal | fixed
    alpha: float = 1.5  # zipf: tail exponent of P(X > x) ~ x^-alpha (a bounded Pareto)
    scale: float = 64.0  # zipf: the smallest length before the tail
    median: float = 200.0  # lognormal
    sigma: float = 0.9  # lognormal
    value: int = 128  # fixed
    min: int = 1
    max: int = 4096

    def validate(self, where: str) -> None:
        if self.dist not in LENGTH_DISTS:
            raise SimConfigError(f"{where}.dist must be one of {', '.join(LENGTH_DISTS)}, got {self.dist!r}")
        _positive(self, where, "alpha", "scale", "median", "sigma")
        if not 1 <= self.min <= self.max:
            raise SimConfigError(f"{where}: need 1 <= min <= max, got min={self.min}, max={self.max}")
        if self.dist == "fixed" and not self.min <= self.value <= self.max:
            raise SimConfigError(f"{where}.value must be within [min, max], got {self.value}")


@dataclass
class WorkloadConfig:
    duration_s: float = 3600.0
    rate_rps: float = 4.0  # mean requests per second over all models
    popularity_zipf: float = 1.1  # model k (1-based) gets a share proportional to k^-s
    arrivals: str = "gamma"  # gamma | weibull | mmpp | poisson, per model
    cv: float = 4.0  # gamma: coefficient of variation of inter-arrival times (> 1 = bursty)
    weibull_shape: float = 0.5  # weibull: shape k (< 1 = bursty)
    mmpp_on_s: float = 60.0  # mmpp: mean length of a model's active period
    mmpp_off_s: float = 600.0  # mmpp: mean length of its silent period
    input_tokens: TokensConfig = field(default_factory=lambda: TokensConfig(dist="zipf", alpha=1.5, scale=64, max=4096))
    output_tokens: TokensConfig = field(default_factory=lambda: TokensConfig(dist="lognormal", median=200, sigma=0.9,
                                                                             max=2048))
    trace: str | None = None  # a CSV trace (timestamp,model,input_tokens,output_tokens) replaces the generator

    def validate(self) -> None:
        _positive(self, "workload", "duration_s", "rate_rps", "cv", "weibull_shape", "mmpp_on_s", "mmpp_off_s")
        _non_negative(self, "workload", "popularity_zipf")
        if self.arrivals not in ARRIVALS:
            raise SimConfigError(f"workload.arrivals must be one of {', '.join(ARRIVALS)}, got {self.arrivals!r}")
        self.input_tokens.validate("workload.input_tokens")
        self.output_tokens.validate("workload.output_tokens")


@dataclass
class MigrationSettings:
    min_gain_s: float = 1.0  # a migration must beat the best free node by this much
    max_targets: int = 4
    recompute_overhead_s: float = 0.05  # b: RPCs and scheduling around the recompute prefill
    kv_overhead_s: float = 0.05  # c: RPCs and the final stop-and-copy round

    def validate(self) -> None:
        _non_negative(self, "migration", "min_gain_s", "recompute_overhead_s", "kv_overhead_s")
        _positive_int(self, "migration", "max_targets")


@dataclass
class BaselineSettings:
    # Loader speed of safetensors-based servers relative to the tier's bandwidth. MEASURED.md:
    # safetensors load_file + clone 0.44 GB/s vs ~1.4 GB/s raw concurrent reads on the dev VM.
    safetensors_efficiency: float = 0.3
    serverlessllm_poll_s: float = 1.0  # ServerlessLLM's controller loop period

    def validate(self) -> None:
        if not 0 < self.safetensors_efficiency <= 1:
            raise SimConfigError("baselines.safetensors_efficiency must be in (0, 1], "
                                 f"got {self.safetensors_efficiency}")
        _non_negative(self, "baselines", "serverlessllm_poll_s")


@dataclass
class SimConfig:
    seed: int = 1
    policies: list[str] = field(default_factory=lambda: list(POLICY_NAMES))
    loads: list[float] = field(default_factory=list)  # request rates to sweep; empty = workload.rate_rps only
    heartbeat_interval_s: float = 2.0  # how often a node's request counts reach the controller
    memory_factor: float = 1.2  # GPU memory of an instance / checkpoint size (the controller's)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)

    def validate(self) -> SimConfig:
        if not self.policies:
            raise SimConfigError("policies is empty; name at least one of " + ", ".join(POLICY_NAMES))
        for name in self.policies:
            if name not in POLICY_NAMES:
                raise SimConfigError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
        if len(set(self.policies)) != len(self.policies):
            raise SimConfigError("policies names a policy twice")
        for rate in self.loads:
            if not (math.isfinite(rate) and rate > 0):
                raise SimConfigError(f"loads are request rates in requests/s and must be > 0, got {rate}")
        _positive(self, "", "heartbeat_interval_s")
        if self.memory_factor < 1:
            raise SimConfigError(f"memory_factor must be >= 1 (an instance holds at least its weights), "
                                 f"got {self.memory_factor}")
        for part in (self.cluster, self.gpu, self.models, self.deployment, self.workload, self.migration,
                     self.baselines):
            part.validate()
        return self

    @property
    def rates(self) -> list[float]:
        return list(self.loads) or [self.workload.rate_rps]


# ---- reading ----------------------------------------------------------------------------------


def load_config(path: str | Path) -> SimConfig:
    """Read and validate a YAML config; a relative workload.trace is relative to the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SimConfigError(f"config file {path} does not exist",
                             "write one with `ember sim --example-config > sim.yaml`") from None
    except OSError as exc:
        raise SimConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SimConfigError(f"{path} is not valid YAML: {exc}") from None
    config = config_from_dict(data if data is not None else {}, str(path))
    if config.workload.trace is not None and not Path(config.workload.trace).is_absolute():
        config.workload.trace = str((path.parent / config.workload.trace).resolve())
    return config


def config_from_dict(data: Any, source: str = "config") -> SimConfig:
    if not isinstance(data, dict):
        raise SimConfigError(f"{source}: the top level must be a mapping of settings, got {type(data).__name__}")
    return _build(SimConfig, data, "").validate()


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SimConfigError(f"{where or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise SimConfigError(f"unknown setting {_join(where, str(unknown[0]))!r}; "
                             f"valid here: {', '.join(names)}")
    values = {}
    for key, value in data.items():
        values[key] = _convert(hints[key], value, _join(where, key))
    try:
        return cls(**values)
    except TypeError as exc:
        raise SimConfigError(f"{where or 'the config'}: {exc}") from None


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, where)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SimConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SimConfigError(f"{where} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(kind)
        return {_convert(key_type, k, where): _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SimConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SimConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {kind!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value > 0):
            raise SimConfigError(f"{_join(where, name)} must be > 0, got {value}")


def _non_negative(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= 0):
            raise SimConfigError(f"{_join(where, name)} must be >= 0, got {value}")


def _positive_int(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise SimConfigError(f"{_join(where, name)} must be >= 1, got {value}")
