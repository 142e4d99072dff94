"""Generated workloads (seeded, skewed, bursty, bounded lengths) and the CSV trace loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.sim.config import TokensConfig, WorkloadConfig
from ember.sim.errors import TraceError
from ember.sim.workload import generate, load_trace, sample_tokens

NAMES = [f"m{i}" for i in range(20)]


def test_generation_is_seeded() -> None:
    config = WorkloadConfig(duration_s=600, rate_rps=5)
    a, b = generate(config, NAMES, seed=1), generate(config, NAMES, seed=1)
    for field in ("times", "models", "tokens_in", "tokens_out"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(generate(config, NAMES, seed=2).times[:50], a.times[:50])


@pytest.mark.parametrize("arrivals", ["gamma", "weibull", "mmpp", "poisson"])
def test_rate_popularity_and_ordering(arrivals: str) -> None:
    config = WorkloadConfig(duration_s=20_000, rate_rps=4, arrivals=arrivals, popularity_zipf=1.1)
    w = generate(config, NAMES, seed=5)
    assert np.all(np.diff(w.times) >= 0) and w.times[0] >= 0 and w.times[-1] < config.duration_s
    assert len(w) / config.duration_s == pytest.approx(4, rel=0.25)
    counts = np.bincount(w.models, minlength=len(NAMES))
    assert counts[0] > 5 * counts[-1]  # Zipf: the first model is far more popular than the last


@pytest.mark.parametrize(("arrivals", "fields"), [("gamma", {"cv": 4.0}), ("weibull", {"weibull_shape": 0.5}),
                                                  ("mmpp", {"mmpp_on_s": 30.0, "mmpp_off_s": 300.0})])
def test_bursty_processes_have_inter_arrival_cv_above_one(arrivals: str, fields: dict) -> None:
    config = WorkloadConfig(duration_s=200_000, rate_rps=1, arrivals=arrivals, **fields)
    w = generate(config, ["only"], seed=9)
    gaps = np.diff(w.times)
    assert gaps.std() / gaps.mean() > 1.5
    poisson = generate(WorkloadConfig(duration_s=200_000, rate_rps=1, arrivals="poisson"), ["only"], seed=9)
    gaps = np.diff(poisson.times)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


def test_token_lengths_are_bounded_and_shaped() -> None:
    rng = np.random.default_rng(0)
    zipf = sample_tokens(TokensConfig(dist="zipf", alpha=1.5, scale=64, max=4096), 50_000, rng)
    assert zipf.min() >= 64 and zipf.max() <= 4096
    assert np.median(zipf) == pytest.approx(64 * 2 ** (1 / 1.5), rel=0.05)  # Pareto median: scale·2^(1/alpha)
    lognormal = sample_tokens(TokensConfig(dist="lognormal", median=200, sigma=0.9, max=2048), 50_000, rng)
    assert np.median(lognormal) == pytest.approx(200, rel=0.05) and lognormal.max() <= 2048
    assert set(sample_tokens(TokensConfig(dist="fixed", value=7), 10, rng)) == {7}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_a_csv_trace_loads_sorted_and_starting_at_zero(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,model,input_tokens,output_tokens,extra\n"
                           "1700000010.5,chat,100,20,x\n1700000000,code,5,300,y\n\n1700000020,chat,7,8,z\n")
    w = load_trace(path)
    assert list(w.times) == [0.0, 10.5, 20.0]
    assert [w.model_names[m] for m in w.models] == ["code", "chat", "chat"]
    assert list(w.tokens_in) == [5, 100, 7] and list(w.tokens_out) == [300, 20, 8]
    scaled = w.at_rate(w.mean_rate * 2)
    assert scaled.times[-1] == pytest.approx(10.0)


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("time,model,input_tokens,output_tokens\n1,a,1,1\n", "lacks column.*timestamp"),
    ("timestamp,model,input_tokens,output_tokens\n", "no requests"),
    ("timestamp,model,input_tokens,output_tokens\nsoon,a,1,1\n", r":2: timestamp 'soon' is not a number"),
    ("timestamp,model,input_tokens,output_tokens\n1,a,1,1\n2,a,0,1\n", r":3: input_tokens must be >= 1"),
    ("timestamp,model,input_tokens,output_tokens\n1,a,1.5,1\n", "not a whole number"),
    ("timestamp,model,input_tokens,output_tokens\n1,,1,1\n", "model column is empty"),
    ("timestamp,model,input_tokens,output_tokens\n1,a,1\n", "expected 4 columns"),
])
def test_bad_traces_are_refused_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_trace(write(tmp_path, text))


def test_a_missing_trace_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")
