"""Memory accounting: which instance holds how many bytes of which device's budget.

A load reserves Backend.memory_needed (weights + KV budget) before it starts, so two loads racing
for the same GPU cannot both be admitted. Budgets are a fraction of each device's memory (the
rest is for the CUDA context, allocator slack and the worker itself); on CPU the DRAM cache's
capacity comes off host memory first. EMBER_WORKER_MEMORY_GB overrides the budget per device
(tests and operators who know better).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

BUDGET_FRACTION = 0.9
MEMORY_ENV = "EMBER_WORKER_MEMORY_GB"


@dataclass
class DeviceBudget:
    name: str  # "cpu" or "cuda:N"
    description: str
    total_bytes: int
    budget_bytes: int
    holders: dict[str, int] = field(default_factory=dict)  # instance id -> bytes

    @property
    def used_bytes(self) -> int:
        return sum(self.holders.values())

    @property
    def free_bytes(self) -> int:
        return max(0, self.budget_bytes - self.used_bytes)


class DeviceUnavailable(ValueError):
    """The load asked for a device this worker does not have."""


class MemoryExhausted(Exception):
    """The instance does not fit; the message says what would (free vs needed, who to unload)."""

    def __init__(self, device: str, needed: int, free: int, holders: dict[str, int], budget: int) -> None:
        self.device, self.needed, self.free, self.holders = device, needed, free, holders
        gib = 2**30
        msg = f"not enough memory on {device}: need {needed / gib:.3f} GiB, {free / gib:.3f} GiB free of {budget / gib:.3f} GiB"
        if needed > budget:
            msg += "; it does not fit even on an empty device"
        else:
            shortfall = needed - free
            freeing, total = [], 0
            for instance_id, nbytes in sorted(holders.items(), key=lambda kv: -kv[1]):
                freeing.append(f"{instance_id} ({nbytes / gib:.3f} GiB)")
                total += nbytes
                if total >= shortfall:
                    break
            msg += f"; unloading {', '.join(freeing)} would make room"
        super().__init__(msg)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _override_bytes() -> int | None:
    raw = os.environ.get(MEMORY_ENV)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MEMORY_ENV}={raw!r} is not a number of GB") from None
    if value <= 0:
        raise ValueError(f"{MEMORY_ENV} must be > 0 GB, got {raw!r}")
    return int(value * 1e9)


class MemoryBudget:
    def __init__(self, devices: list[DeviceBudget]) -> None:
        if not devices:
            raise ValueError("a worker needs at least one device")
        self.devices = {d.name: d for d in devices}
        self._lock = threading.Lock()

    @classmethod
    def detect(cls, kind: str, dram_cache_bytes: int = 0) -> MemoryBudget:
        """The worker's devices of `kind` ("cpu" or "cuda") with their budgets."""
        override = _override_bytes()
        if kind == "cpu":
            total = host_memory_bytes()
            budget = override if override is not None else max(0, int(total * BUDGET_FRACTION) - dram_cache_bytes)
            return cls([DeviceBudget("cpu", "host memory", total, budget)])
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise DeviceUnavailable(
                    "--device cuda but torch sees no CUDA device on this node; use --device cpu or check the driver"
                )
            devices = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                total = int(props.total_memory)
                budget = override if override is not None else int(total * BUDGET_FRACTION)
                devices.append(DeviceBudget(f"cuda:{i}", props.name, total, budget))
            return cls(devices)
        raise DeviceUnavailable(f"unknown device kind {kind!r}; use cpu or cuda")

    def resolve(self, device: str, needed: int) -> str:
        """A concrete device name for a request ("" = any, "cuda" = any GPU): the first that fits."""
        requested = device.strip().lower()
        if requested in self.devices:
            return requested
        if requested == "":
            candidates = list(self.devices.values())
        elif requested == "cuda":
            candidates = [d for d in self.devices.values() if d.name.startswith("cuda:")]
        else:
            candidates = []
        if not candidates:
            raise DeviceUnavailable(
                f"device {device!r} is not available on this worker (devices: {', '.join(self.devices)})"
            )
        with self._lock:
            fitting = [d for d in candidates if d.free_bytes >= needed]
            return (fitting[0] if fitting else max(candidates, key=lambda d: d.free_bytes)).name

    def reserve(self, device: str, instance_id: str, nbytes: int) -> None:
        with self._lock:
            budget = self.devices[device]
            if nbytes > budget.free_bytes:
                raise MemoryExhausted(device, nbytes, budget.free_bytes, dict(budget.holders), budget.budget_bytes)
            budget.holders[instance_id] = nbytes

    def release(self, instance_id: str) -> int:
        with self._lock:
            return sum(d.holders.pop(instance_id, 0) for d in self.devices.values())

    def snapshot(self) -> list[DeviceBudget]:
        with self._lock:
            return [
                DeviceBudget(d.name, d.description, d.total_bytes, d.budget_bytes, dict(d.holders))
                for d in self.devices.values()
            ]
