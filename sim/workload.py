"""Requests to simulate: generated from a seed, or read from a user's CSV trace.

The generator is modelled on two public trace studies; it reproduces their *shapes*, with
parameters of our choosing — it is not real trace data and nothing is downloaded:
- Azure Functions (Shahrad et al., ATC'20): invocation counts per function are heavily skewed
  and inter-arrival times are bursty (CV > 1). Here: model k (1-based, by popularity) gets a
  share ∝ k^-popularity_zipf of the total rate, and each model's arrivals are an independent
  renewal process with gamma (CV `cv`) or Weibull (shape < 1) gaps, or an on/off
  Markov-modulated Poisson process (exponential on and off periods, Poisson while on).
- BurstGPT (Wang et al., 2024): request lengths have a Zipf-like heavy tail (here a bounded
  Pareto: scale · U^(-1/alpha), clipped) and response lengths are wide and right-skewed (here
  lognormal with a median and sigma), clipped to [min, max].

A CSV trace has the header `timestamp,model,input_tokens,output_tokens` (other columns are
ignored): timestamps in seconds (the earliest becomes 0), one request per line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.sim.config import TokensConfig, WorkloadConfig
from ember.sim.errors import TraceError

TRACE_COLUMNS = ("timestamp", "model", "input_tokens", "output_tokens")


@dataclass
class Workload:
    times: np.ndarray  # arrival times (s), ascending
    models: np.ndarray  # index into model_names
    tokens_in: np.ndarray
    tokens_out: np.ndarray
    model_names: list[str]
    description: str

    def __len__(self) -> int:
        return len(self.times)

    @property
    def duration_s(self) -> float:
        return float(self.times[-1]) if len(self.times) else 0.0

    @property
    def mean_rate(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else float(len(self))

    def at_rate(self, rate_rps: float) -> Workload:
        """The same requests with time compressed or stretched to a mean rate (for load sweeps of a trace)."""
        factor = self.mean_rate / rate_rps
        return Workload(self.times * factor, self.models, self.tokens_in, self.tokens_out, self.model_names,
                        f"{self.description}, time scaled ×{factor:.3g} to {rate_rps:g} req/s")


def popularity(n_models: int, zipf_s: float) -> np.ndarray:
    weights = np.arange(1, n_models + 1, dtype=float) ** -zipf_s
    return weights / weights.sum()


def generate(config: WorkloadConfig, model_names: list[str], seed: int, rate_rps: float | None = None) -> Workload:
    rate = config.rate_rps if rate_rps is None else rate_rps
    shares = popularity(len(model_names), config.popularity_zipf)
    streams = np.random.SeedSequence([seed, 1]).spawn(len(model_names) + 1)
    times, models = [], []
    for k, share in enumerate(shares):
        arrivals = _arrivals(config, rate * share, config.duration_s, np.random.default_rng(streams[k]))
        times.append(arrivals)
        models.append(np.full(len(arrivals), k, dtype=np.int32))
    all_times = np.concatenate(times) if times else np.zeros(0)
    all_models = np.concatenate(models) if models else np.zeros(0, dtype=np.int32)
    order = np.argsort(all_times, kind="stable")
    lengths = np.random.default_rng(streams[-1])
    n = len(order)
    description = (f"generated: {rate:g} req/s for {config.duration_s:g} s over {len(model_names)} models, "
                   f"Zipf popularity s={config.popularity_zipf:g}, {_arrival_text(config)} arrivals")
    return Workload(all_times[order], all_models[order], sample_tokens(config.input_tokens, n, lengths),
                    sample_tokens(config.output_tokens, n, lengths), list(model_names), description)


def _arrival_text(config: WorkloadConfig) -> str:
    if config.arrivals == "gamma":
        return f"gamma (CV {config.cv:g})"
    if config.arrivals == "weibull":
        return f"Weibull (shape {config.weibull_shape:g})"
    if config.arrivals == "mmpp":
        return f"on/off MMPP (on {config.mmpp_on_s:g} s, off {config.mmpp_off_s:g} s)"
    return "Poisson"


def _arrivals(config: WorkloadConfig, rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    if rate <= 0:
        return np.zeros(0)
    if config.arrivals == "mmpp":
        return _mmpp(config, rate, duration, rng)
    mean = 1.0 / rate
    if config.arrivals == "gamma":
        shape = 1.0 / config.cv**2
        draw = lambda n: rng.gamma(shape, mean / shape, n)  # noqa: E731
    elif config.arrivals == "weibull":
        k = config.weibull_shape
        draw = lambda n: rng.weibull(k, n) * (mean / math.gamma(1 + 1 / k))  # noqa: E731
    else:
        draw = lambda n: rng.exponential(mean, n)  # noqa: E731
    expected = rate * duration
    chunks, last = [], 0.0
    while last <= duration:
        gaps = draw(int(expected + 4 * math.sqrt(expected) + 16))
        arrivals = last + np.cumsum(gaps)
        chunks.append(arrivals)
        last = float(arrivals[-1])
    out = np.concatenate(chunks)
    return out[out < duration]


def _mmpp(config: WorkloadConfig, rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """On/off Markov-modulated Poisson: the mean rate is `rate`, all of it sent while on."""
    on, off = config.mmpp_on_s, config.mmpp_off_s
    rate_on = rate * (on + off) / on
    t, active = 0.0, rng.random() < on / (on + off)
    chunks = []
    while t < duration:
        period = rng.exponential(on if active else off)
        end = min(duration, t + period)
        if active:
            count = rng.poisson(rate_on * (end - t))
            chunks.append(np.sort(rng.uniform(t, end, count)))
        t, active = end, not active
    return np.concatenate(chunks) if chunks else np.zeros(0)


def sample_tokens(config: TokensConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    if config.dist == "fixed":
        values = np.full(n, float(config.value))
    elif config.dist == "zipf":
        values = config.scale * rng.random(n) ** (-1.0 / config.alpha)
    else:
        values = config.median * np.exp(config.sigma * rng.standard_normal(n))
    return np.clip(np.rint(values), config.min, config.max).astype(np.int64)


# ---- CSV traces ---------------------------------------------------------------------------------


def load_trace(path: str | Path) -> Workload:
    path = Path(path)
    try:
        handle = path.open(newline="")
    except FileNotFoundError:
        raise TraceError(f"trace file {path} does not exist") from None
    except OSError as exc:
        raise TraceError(f"cannot read trace file {path}: {exc.strerror}") from None
    names: dict[str, int] = {}
    times: list[float] = []
    models: list[int] = []
    tokens_in: list[int] = []
    tokens_out: list[int] = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path} is empty", f"the first line must be the header {','.join(TRACE_COLUMNS)}")
        columns = [h.strip().lower() for h in header]
        missing = [c for c in TRACE_COLUMNS if c not in columns]
        if missing:
            raise TraceError(f"{path}:1: the header lacks column(s) {', '.join(missing)}",
                             f"the first line must name the columns {','.join(TRACE_COLUMNS)}")
        index = [columns.index(c) for c in TRACE_COLUMNS]
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < len(columns):
                raise TraceError(f"{path}:{lineno}: expected {len(columns)} columns, got {len(row)}")
            stamp, model, t_in, t_out = (row[i].strip() for i in index)
            times.append(_number(path, lineno, "timestamp", stamp))
            if not model:
                raise TraceError(f"{path}:{lineno}: the model column is empty")
            models.append(names.setdefault(model, len(names)))
            tokens_in.append(_tokens(path, lineno, "input_tokens", t_in))
            tokens_out.append(_tokens(path, lineno, "output_tokens", t_out))
    if not times:
        raise TraceError(f"{path} has a header but no requests")
    stamps = np.array(times)
    order = np.argsort(stamps, kind="stable")
    stamps = stamps[order] - stamps.min()
    return Workload(stamps, np.array(models, dtype=np.int32)[order], np.array(tokens_in, dtype=np.int64)[order],
                    np.array(tokens_out, dtype=np.int64)[order], list(names),
                    f"trace {path.name}: {len(stamps)} requests over {stamps[-1]:.0f} s, {len(names)} models")


def _number(path: Path, lineno: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{lineno}: {column} {text!r} is not a number (seconds)") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"{path}:{lineno}: {column} must be a finite number >= 0, got {text!r}")
    return value


def _tokens(path: Path, lineno: int, column: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(f"{path}:{lineno}: {column} {text!r} is not a whole number of tokens") from None
    if value < 1:
        raise TraceError(f"{path}:{lineno}: {column} must be >= 1, got {value}")
    return value
