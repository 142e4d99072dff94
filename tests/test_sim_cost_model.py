"""The migration cost model: least-squares fits of measured migrations, and the cheaper method."""

from __future__ import annotations

import random

import pytest

from ember.migration.cost_model import CostModelError, MigrationCostModel, fit_line


def test_fit_recovers_the_constants_of_exact_measurements() -> None:
    a, b, bw, c = 2e-4, 0.03, 12.5, 0.02
    recompute = [(tokens, a * tokens + b) for tokens in (100, 500, 2000, 8000)]
    kv = [(nbytes, nbytes / (bw * 1e9) + c) for nbytes in (10**7, 10**8, 10**9)]
    model = MigrationCostModel.fit(recompute, kv)
    assert model.recompute_s_per_token == pytest.approx(a)
    assert model.recompute_overhead_s == pytest.approx(b)
    assert model.net_gbps == pytest.approx(bw)
    assert model.kv_overhead_s == pytest.approx(c)


def test_fit_averages_out_noise() -> None:
    rng = random.Random(7)
    a, b = 1e-4, 0.05
    samples = [(t, a * t + b + rng.gauss(0, 0.002)) for t in range(100, 10_000, 50)]
    slope, intercept = fit_line(samples)
    assert slope == pytest.approx(a, rel=0.05)
    assert intercept == pytest.approx(b, abs=0.005)


def test_the_cheaper_method_wins_and_can_be_restricted() -> None:
    model = MigrationCostModel(recompute_s_per_token=1e-3, recompute_overhead_s=0.0, net_gbps=10.0, kv_overhead_s=0.1)
    # 1000 tokens: recompute 1.0 s; KV of 1 GB: 0.1 + 0.1 = 0.2 s.
    best = model.best(600, 400, 10**9)
    assert (best.method, best.seconds) == ("kv", pytest.approx(0.2))
    # Few tokens: recompute (0.05 s) beats the KV overhead alone.
    assert model.best(30, 20, 10**6).method == "recompute"
    restricted = model.only("recompute").best(600, 400, 10**9)
    assert restricted.method == "recompute" and restricted.seconds == pytest.approx(1.0)


def test_round_trip_through_a_dict() -> None:
    model = MigrationCostModel(2e-4, 0.03, 12.5, 0.02, ("kv",))
    assert MigrationCostModel.from_dict(model.to_dict()) == model


@pytest.mark.parametrize(
    ("recompute", "kv", "message"),
    [
        ([(100, 0.1)], [(1, 1.0), (2, 2.0)], "at least 2"),
        ([(100, 0.1), (100, 0.2)], [(1, 1.0), (2, 2.0)], "same size"),
        ([(100, 0.5), (200, 0.1)], [(1, 1.0), (2, 2.0)], "time per token"),
        ([(100, 0.1), (200, 0.2)], [(10, 2.0), (20, 1.0)], "per byte"),
    ],
)
def test_samples_that_cannot_make_a_model_are_refused(recompute, kv, message) -> None:
    with pytest.raises(CostModelError, match=message):
        MigrationCostModel.fit(recompute, kv)


def test_bad_constants_are_refused_by_name() -> None:
    with pytest.raises(CostModelError, match="net_gbps"):
        MigrationCostModel(1e-4, 0.0, 0.0, 0.0)
    with pytest.raises(CostModelError, match="recompute_overhead_s"):
        MigrationCostModel(1e-4, -1.0, 10.0, 0.0)
    with pytest.raises(CostModelError, match="methods"):
        MigrationCostModel(1e-4, 0.0, 10.0, 0.0, ("teleport",))
    with pytest.raises(CostModelError, match="unknown"):
        MigrationCostModel.from_dict({"recompute_s_per_token": 1e-4, "speed": 3})
    # Without KV transfer the network does not matter.
    assert MigrationCostModel(1e-4, 0.0, 0.0, 0.0, ("recompute",)).best(10, 10, 10**9).method == "recompute"
