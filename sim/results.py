"""What a simulation run measured, summarised the way the comparison reports it.

Latency percentiles are over completed requests; rejected ones (queue full, timed out in the
queue) are counted separately, so read the two together: a system that rejects its slowest
requests looks faster in the percentiles than it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.sim.engine import COMPLETED, PENDING, REJECTED, Simulation


@dataclass
class RunResult:
    policy: str
    rate_rps: float
    summary: dict
    ttft: np.ndarray  # completed requests only, seconds
    e2e: np.ndarray


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def summarize(sim: Simulation, policy: str, rate_rps: float, wall_s: float) -> RunResult:
    status = sim.status
    pending = int(np.count_nonzero(status == PENDING))
    if pending:
        raise AssertionError(f"{pending} request(s) neither completed nor rejected: the simulation lost them")
    done = status == COMPLETED
    ttft = sim.ttft[done]
    e2e = sim.e2e[done]
    c = sim.counters
    ratios = np.array(c.estimate_ratios) if c.estimate_ratios else np.zeros(0)
    summary = {
        "rate_rps": rate_rps,
        "requests": int(len(status)),
        "completed": int(np.count_nonzero(done)),
        "rejected": int(np.count_nonzero(status == REJECTED)),
        "rejected_by_reason": dict(c.rejected),
        "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95), "ttft_p99": _pct(ttft, 99),
        "ttft_mean": round(float(ttft.mean()), 4) if len(ttft) else None,
        "e2e_p50": _pct(e2e, 50), "e2e_p95": _pct(e2e, 95), "e2e_p99": _pct(e2e, 99),
        "queued_requests": int(np.count_nonzero(sim.queued)),
        "cold_starts": int(sum(c.cold_starts.values())),
        "cold_starts_by_tier": dict(c.cold_starts),
        "gpu_seconds": round(sum(n.gpu_seconds for n in sim.nodes.values()), 1),
        "migrations": c.migrations,
        "migration_plans": c.migration_plans,
        "migrated_requests": dict(c.migrated_requests),
        "placements": c.placements,
        "ready_estimate_ratio_p50": _pct(ratios, 50),
        "ready_estimate_ratio_p90": _pct(ratios, 90),
        "simulated_s": round(sim.now, 1),
        "events": c.events,
        "wall_s": round(wall_s, 2),
    }
    return RunResult(policy, rate_rps, summary, ttft, e2e)
