"""How many instances a deployment should have, from its queue and its requests in flight.

Scale out at once, scale in slowly — the asymmetry is the hysteresis that keeps a fluctuating
load from thrashing instances (each start is a cold start):
- out: desired = ceil((queued + in flight) / target_concurrency), clamped to [min, max]; every
  missing instance starts in the same decision, so a burst of 40 requests with a target of 8
  starts 5 instances together instead of one per round;
- in: only an instance that has been idle (no request in flight) for keep_alive_s is stopped,
  oldest-idle first, and only while the rest still cover the demand and min_instances. With
  min_instances 0 the last one goes too: scale to zero.
Instances still starting count as capacity (a second request during a cold start does not
start a second instance) and are never stopped mid-load.

Pure decision logic: inputs are dataclasses and `now`; the output says what to start and stop
and when the next keep-alive expires, so the caller can arm one timer instead of polling. The
simulator drives this module unchanged with a virtual clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class InstanceLoad:
    id: str
    state: str  # "starting" | "loading" | "ready" | "stopping"
    in_flight: int = 0
    idle_since: float | None = None  # when in_flight last dropped to 0 (or it became ready); None while busy


@dataclass
class DeploymentLoad:
    name: str
    min_instances: int
    max_instances: int
    target_concurrency: int
    keep_alive_s: float
    queued: int = 0
    instances: list[InstanceLoad] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(i.in_flight for i in self.instances)


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    start: int = 0
    stop: tuple[str, ...] = ()
    next_check_at: float | None = None  # when an idle instance's keep-alive runs out
    reason: str = ""


class Autoscaler:
    def decide(self, load: DeploymentLoad, now: float) -> ScaleDecision:
        live = [i for i in load.instances if i.state != "stopping"]
        demand = load.queued + load.in_flight
        by_load = math.ceil(demand / load.target_concurrency)
        desired = min(load.max_instances, max(load.min_instances, by_load))
        current = len(live)
        if desired > current:
            return ScaleDecision(
                desired, start=desired - current,
                reason=f"demand {demand} (queued {load.queued}, in flight {load.in_flight}) needs {desired} "
                       f"instance(s) at target concurrency {load.target_concurrency}; have {current}",
            )
        surplus = current - desired
        if surplus <= 0:
            return ScaleDecision(desired, reason="at desired size")
        idle = sorted(
            (i for i in live if i.state == "ready" and i.in_flight == 0 and i.idle_since is not None),
            key=lambda i: (i.idle_since, i.id),
        )
        stop = [i.id for i in idle if now - i.idle_since >= load.keep_alive_s][:surplus]
        waiting = [i.idle_since + load.keep_alive_s for i in idle if i.id not in stop]
        next_check = min(waiting) if waiting and len(stop) < surplus else None
        reason = (
            f"{len(stop)} instance(s) idle for {load.keep_alive_s:g} s beyond demand {demand}" if stop
            else f"{surplus} surplus instance(s) within keep-alive"
        )
        return ScaleDecision(desired, stop=tuple(stop), next_check_at=next_check, reason=reason)
