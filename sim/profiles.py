"""The systems compared, each as settings of the same controller code plus simulated hardware knobs.

A profile picks the controller's scheduling policy (ember.controller.scheduler, unchanged),
whether the migration planner runs and with which methods, which cache tiers the workers
keep, and how fast their loader is. Nothing here re-implements a scheduler; what the real
controller has no equivalent of is modelled in the simulator (and listed in
docs/simulation.md): ServerlessLLM's pinned DRAM pool and its polling loop, and the
download-then-load path of the safetensors-based baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.sim.config import ClusterConfig, SimConfig


@dataclass(frozen=True)
class PolicyProfile:
    name: str
    scheduler_policy: str  # SchedulerConfig.policy of the controller
    dram_tier: bool  # workers keep checkpoints in a DRAM cache
    disk_tier: bool  # workers keep checkpoints in a local disk cache
    loader_efficiency: float  # fraction of a tier's bandwidth the loader reaches
    pipelined_fetch: bool  # S3 bytes stream through to the GPU (else: download to disk, then load)
    migration: tuple[str, ...]  # migration methods the planner may use; () = no migration
    pinned_dram_pool: bool  # a load needs the whole model in DRAM, pinned while an instance of it runs
    poll_s: float  # scale-out decisions wait for the next tick of a polling loop (0 = on events)
    summary: str

    def tier_gbps(self, cluster: ClusterConfig, factor: float = 1.0) -> dict[str, float]:
        """GB/s a load reaches from each source tier, as the worker would measure it."""
        eff = self.loader_efficiency
        disk = cluster.disk_gbps * factor * eff
        s3 = cluster.s3_gbps * factor
        rates = {"s3": min(s3, disk) if self.pipelined_fetch else 1.0 / (1.0 / s3 + 1.0 / disk)}
        if self.disk_tier:
            rates["disk"] = disk
        if self.dram_tier:
            rates["dram"] = cluster.dram_gbps * factor * eff
        return rates


def make_profile(name: str, config: SimConfig) -> PolicyProfile:
    base = config.baselines
    safetensors = base.safetensors_efficiency
    profiles = {
        "ember": PolicyProfile(
            "ember", "locality", True, True, 1.0, True, ("recompute", "kv"), False, 0.0,
            "locality scheduler (time-to-ready), S3→disk→DRAM caches, streaming loader, live migration "
            "(KV transfer or recompute, whichever is cheaper)"),
        "ember-no-migration": PolicyProfile(
            "ember-no-migration", "locality", True, True, 1.0, True, (), False, 0.0,
            "as ember, without the migration planner"),
        "serverlessllm": PolicyProfile(
            "serverlessllm", "locality", True, True, 1.0, True, ("recompute",), True, base.serverlessllm_poll_s,
            "locality scheduler, loading-optimised checkpoints, token-based (recompute) migration; a load "
            "needs the whole model pinned in the DRAM pool; scale-out decisions on a "
            f"{base.serverlessllm_poll_s:g} s polling loop"),
        "kserve": PolicyProfile(
            "kserve", "random", False, False, safetensors, False, (), False, 0.0,
            "any node with a free GPU; every cold start downloads from remote storage, then loads with "
            f"safetensors ({safetensors:g}× the disk bandwidth); no DRAM or disk cache"),
        "rayserve": PolicyProfile(
            "rayserve", "least-loaded", False, True, safetensors, False, (), False, 0.0,
            "least-loaded node, local disk cache but no locality in placement, no DRAM cache, safetensors "
            "loader"),
    }
    return profiles[name]
