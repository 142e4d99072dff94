"""Run a configuration: every policy at every request rate, each on the same requests.

All policies at one rate see the identical request sequence (same seed, same arrivals, same
lengths), so their differences come from the systems, not from the draw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.sim.catalog import ModelSpec, build_catalog
from ember.sim.config import SimConfig
from ember.sim.engine import Simulation
from ember.sim.errors import SimConfigError
from ember.sim.profiles import make_profile
from ember.sim.results import RunResult, summarize
from ember.sim.workload import Workload, generate, load_trace

Progress = Callable[[str, float], None]  # (what, fraction done)


@dataclass
class Sweep:
    config: SimConfig
    catalog: list[ModelSpec]
    descriptions: dict[float, str] = field(default_factory=dict)  # rate -> workload description
    runs: dict[float, dict[str, RunResult]] = field(default_factory=dict)  # rate -> policy -> result

    @property
    def primary(self) -> dict[str, RunResult]:
        """The results at the first rate (the config's rate when no sweep is asked)."""
        return self.runs[next(iter(self.runs))]

    def to_json(self) -> dict:
        data: dict = {"policies": {name: r.summary for name, r in self.primary.items()}}
        if len(self.runs) > 1:
            data["sweep"] = [{"rate_rps": rate, "workload": self.descriptions[rate],
                              "policies": {name: r.summary for name, r in runs.items()}}
                             for rate, runs in self.runs.items()]
        data["workload"] = self.descriptions[next(iter(self.runs))]
        data["cluster"] = {"nodes": self.config.cluster.nodes, "gpus_per_node": self.config.cluster.gpus_per_node,
                           "models": len(self.catalog), "seed": self.config.seed}
        return data


def workloads(config: SimConfig) -> tuple[list[ModelSpec], dict[float, Workload]]:
    """The catalog and one workload per rate of the sweep."""
    if config.workload.trace is not None:
        trace = load_trace(config.workload.trace)
        catalog = build_catalog(config, trace.model_names)
        by_rate = {rate: trace.at_rate(rate) for rate in config.loads} if config.loads else {trace.mean_rate: trace}
    else:
        catalog = build_catalog(config)
        names = [m.name for m in catalog]
        by_rate = {rate: generate(config.workload, names, config.seed, rate) for rate in config.rates}
    _check_pinned_pool(config, catalog)
    return catalog, by_rate


def _check_pinned_pool(config: SimConfig, catalog: list[ModelSpec]) -> None:
    if "serverlessllm" not in config.policies:
        return
    largest = max(catalog, key=lambda m: m.size_bytes)
    if largest.size_bytes > config.cluster.dram_gb * 1e9:
        raise SimConfigError(
            f"the serverlessllm policy loads through a pinned DRAM pool that must hold a whole model, but "
            f"{largest.name} ({largest.size_bytes / 1e9:.0f} GB) exceeds cluster.dram_gb={config.cluster.dram_gb:g}",
            "raise cluster.dram_gb or drop serverlessllm from policies",
        )


def run_one(config: SimConfig, policy: str, catalog: list[ModelSpec], workload: Workload, rate: float,
            progress: Callable[[float], None] | None = None) -> RunResult:
    started = time.perf_counter()
    sim = Simulation(config, make_profile(policy, config), catalog, workload).run(progress)
    return summarize(sim, policy, rate, time.perf_counter() - started)


def run_sweep(config: SimConfig, progress: Progress | None = None) -> Sweep:
    catalog, by_rate = workloads(config)
    sweep = Sweep(config, catalog)
    for rate, workload in by_rate.items():
        if len(workload) == 0:
            raise SimConfigError(f"the workload at {rate:g} req/s has no requests",
                                 "raise workload.rate_rps or workload.duration_s")
        sweep.descriptions[rate] = workload.description
        sweep.runs[rate] = {}
        for policy in config.policies:
            label = f"{policy} @ {rate:g} req/s"
            tick = (lambda f, label=label: progress(label, f)) if progress is not None else None
            sweep.runs[rate][policy] = run_one(config, policy, catalog, workload, rate, tick)
            if progress is not None:
                progress(label, 1.0)
    return sweep
