"""Memory accounting: reservations per device and the message a refused load gets."""

from __future__ import annotations

import pytest

from ember.worker.memory import DeviceBudget, DeviceUnavailable, MemoryBudget, MemoryExhausted

GiB = 2**30


def two_gpus() -> MemoryBudget:
    return MemoryBudget(
        [DeviceBudget("cuda:0", "gpu", 10 * GiB, 8 * GiB), DeviceBudget("cuda:1", "gpu", 10 * GiB, 8 * GiB)]
    )


def test_refusal_says_what_is_free_and_what_to_unload() -> None:
    budget = MemoryBudget([DeviceBudget("cpu", "host", 10 * GiB, 8 * GiB)])
    budget.reserve("cpu", "small", 1 * GiB)
    budget.reserve("cpu", "big", 5 * GiB)
    with pytest.raises(MemoryExhausted) as info:
        budget.reserve("cpu", "new", 4 * GiB)
    message = str(info.value)
    assert "need 4.000 GiB" in message and "2.000 GiB free" in message
    assert "unloading big" in message and "small" not in message.split("unloading")[1]
    assert budget.release("big") == 5 * GiB
    budget.reserve("cpu", "new", 4 * GiB)


def test_a_model_bigger_than_the_device_says_so() -> None:
    budget = MemoryBudget([DeviceBudget("cpu", "host", 10 * GiB, 8 * GiB)])
    with pytest.raises(MemoryExhausted) as info:
        budget.reserve("cpu", "huge", 9 * GiB)
    assert "does not fit even on an empty device" in str(info.value)


def test_resolve_picks_a_gpu_that_fits_and_refuses_unknown_devices() -> None:
    budget = two_gpus()
    budget.reserve("cuda:0", "a", 6 * GiB)
    assert budget.resolve("cuda", 4 * GiB) == "cuda:1"
    assert budget.resolve("", 1 * GiB) == "cuda:0"
    assert budget.resolve("cuda:0", 1 * GiB) == "cuda:0"
    with pytest.raises(DeviceUnavailable) as info:
        budget.resolve("cpu", 1)
    assert "cuda:0, cuda:1" in str(info.value)
    with pytest.raises(DeviceUnavailable):
        budget.resolve("cuda:7", 1)


def test_env_override_sets_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_WORKER_MEMORY_GB", "1.5")
    budget = MemoryBudget.detect("cpu", dram_cache_bytes=10 * GiB)
    assert budget.devices["cpu"].budget_bytes == 1_500_000_000
    monkeypatch.setenv("EMBER_WORKER_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="EMBER_WORKER_MEMORY_GB"):
        MemoryBudget.detect("cpu")
