"""How long moving one in-flight request to another worker takes, by either of two methods.

DESIGN.md ("Live migration") moves a request's state one of two ways:
- recompute: the destination rebuilds the KV cache from prompt + generated tokens in one
  prefill, so the cost grows with the tokens: ``a·(tokens_in + tokens_out) + b``;
- KV transfer: the source streams its KV blocks over the network, so the cost grows with the
  bytes: ``kv_bytes / net_bw + c``.
Which is cheaper depends on the model (a big GQA model has few KV bytes per token but a slow
prefill) and on the network, so the model keeps both and answers the cheaper.

The constants are fitted by ordinary least squares from measured migrations (tokens → seconds,
bytes → seconds) rather than guessed: a worker that timed a few migrations hands the samples
to `MigrationCostModel.fit`. Pure Python, no torch: the controller (which must run without the
worker extra) and the simulator use it as well as the workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

METHODS = ("recompute", "kv")


class CostModelError(ValueError):
    """Samples or constants that cannot make a cost model; the message says which and why."""

    hint = "measure at least two migrations of different sizes (tokens for recompute, bytes for KV)"


@dataclass(frozen=True)
class MigrationCost:
    method: str  # "recompute" | "kv"
    seconds: float


@dataclass(frozen=True)
class MigrationCostModel:
    recompute_s_per_token: float  # a
    recompute_overhead_s: float  # b
    net_gbps: float  # GB/s between workers, as KV transfers achieved it
    kv_overhead_s: float  # c
    methods: tuple[str, ...] = METHODS  # the methods this deployment may use

    def __post_init__(self) -> None:
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise CostModelError(f"migration methods must be a non-empty subset of {METHODS}, got {self.methods!r}")
        for name in ("recompute_s_per_token", "recompute_overhead_s", "kv_overhead_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise CostModelError(f"{name} must be a finite number >= 0, got {value!r}")
        if "kv" in self.methods and not (math.isfinite(self.net_gbps) and self.net_gbps > 0):
            raise CostModelError(f"net_gbps must be > 0 when KV transfer is allowed, got {self.net_gbps!r}")

    def recompute_s(self, tokens_in: int, tokens_out: int) -> float:
        return self.recompute_s_per_token * (tokens_in + tokens_out) + self.recompute_overhead_s

    def kv_transfer_s(self, kv_bytes: int) -> float:
        return kv_bytes / (self.net_gbps * 1e9) + self.kv_overhead_s

    def best(self, tokens_in: int, tokens_out: int, kv_bytes: int) -> MigrationCost:
        """The cheaper allowed method for one request (ties go to recompute: it sends less)."""
        best: MigrationCost | None = None
        for method in self.methods:
            seconds = self.recompute_s(tokens_in, tokens_out) if method == "recompute" else self.kv_transfer_s(kv_bytes)
            if best is None or seconds < best.seconds:
                best = MigrationCost(method, seconds)
        assert best is not None  # methods is non-empty (checked at construction)
        return best

    def only(self, *methods: str) -> MigrationCostModel:
        """The same constants restricted to some methods (e.g. token-only migration)."""
        return MigrationCostModel(self.recompute_s_per_token, self.recompute_overhead_s, self.net_gbps,
                                  self.kv_overhead_s, tuple(methods))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MigrationCostModel:
        known = {"recompute_s_per_token", "recompute_overhead_s", "net_gbps", "kv_overhead_s", "methods"}
        unknown = set(data) - known
        if unknown:
            raise CostModelError(f"unknown cost model field(s) {sorted(unknown)}; expected {sorted(known)}")
        fields = dict(data)
        if "methods" in fields:
            fields["methods"] = tuple(fields["methods"])
        try:
            return cls(**fields)
        except TypeError as exc:
            raise CostModelError(f"incomplete cost model {data!r}: {exc}") from None

    @classmethod
    def fit(cls, recompute_samples: Iterable[tuple[float, float]], kv_samples: Iterable[tuple[float, float]],
            methods: Sequence[str] = METHODS) -> MigrationCostModel:
        """Fit a, b from (tokens, seconds) and net_bw, c from (kv_bytes, seconds) measurements."""
        a, b = fit_line(recompute_samples, "recompute (tokens, seconds)")
        per_byte, c = fit_line(kv_samples, "KV transfer (bytes, seconds)")
        if a <= 0:
            raise CostModelError(f"recompute samples give a time per token of {a:.3g} s (must be > 0): "
                                 "more tokens must take longer; check the measurements")
        if per_byte <= 0:
            raise CostModelError(f"KV samples give {per_byte:.3g} s per byte (must be > 0): "
                                 "more bytes must take longer; check the measurements")
        # A small negative intercept is measurement noise around a near-zero overhead.
        return cls(a, max(0.0, b), 1.0 / per_byte / 1e9, max(0.0, c), tuple(methods))


def fit_line(samples: Iterable[tuple[float, float]], what: str = "samples") -> tuple[float, float]:
    """Least-squares slope and intercept of y = slope·x + intercept."""
    points = [(float(x), float(y)) for x, y in samples]
    if len(points) < 2:
        raise CostModelError(f"{what}: need at least 2 measurements to fit a line, got {len(points)}")
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in points):
        raise CostModelError(f"{what}: measurements must be finite numbers")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        raise CostModelError(f"{what}: every measurement has the same size ({mean_x:g}); "
                             "measure at least two different sizes")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


__all__ = ["METHODS", "CostModelError", "MigrationCost", "MigrationCostModel", "fit_line"]
