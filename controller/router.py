"""Requests to instances: a bounded FIFO queue per deployment, dispatch driven by events.

A request takes a free slot at once when one exists (the warm path costs no await); otherwise
it waits in its deployment's queue on a future, which is resolved the moment a slot frees up or
an instance becomes ready — no polling anywhere between arrival and dispatch. An instance
takes at most `target_concurrency` requests at a time (like Knative's containerConcurrency);
the rest wait here, where the autoscaler can see them. A full queue refuses with 429 and a
Retry-After estimated from how fast the queue drains.

The router knows nothing of gRPC or HTTP: the controller tells it about instances (starting,
ready, gone) and it calls `on_demand(deployment)` whenever a queue grows, so the autoscaler
runs exactly when demand changes.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.controller.errors import ControllerError, Gone, ModelNotFound, QueueFull, Unavailable
from ember.controller.models import DeploymentRecord

ProgressFn = Callable[[float, str], None]


@dataclass(eq=False)
class InstanceSlot:
    """What the router needs of an instance; the controller owns the rest of its lifecycle."""

    id: str
    deployment: str
    node: str
    address: str
    state: str = "starting"  # starting | loading | ready | stopping
    created_at: float = 0.0
    ready_at: float | None = None
    in_flight: int = 0
    idle_since: float | None = None
    order: int = 0
    expected_ready_at: float | None = None  # from the scheduler's estimate
    progress: float = 0.0  # percent of the load done, as best known
    first_token_pending: bool = False  # the next first token ends this instance's cold start


class Ticket:
    __slots__ = ("future", "enqueued_at", "on_progress")

    def __init__(self, enqueued_at: float, on_progress: ProgressFn | None) -> None:
        self.future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.enqueued_at = enqueued_at
        self.on_progress = on_progress


@dataclass(eq=False)
class Lease:
    slot: InstanceSlot
    arrived_at: float
    dispatched_at: float
    queued: bool  # waited in the queue
    cold_start: bool  # its instance was started while it waited (it ends that cold start)
    released: bool = False

    @property
    def queue_wait_s(self) -> float:
        return self.dispatched_at - self.arrived_at


@dataclass(eq=False)
class DeploymentState:
    record: DeploymentRecord
    queue: deque[Ticket] = field(default_factory=deque)
    slots: dict[str, InstanceSlot] = field(default_factory=dict)
    duration_ewma_s: float | None = None
    init_ewma_s: float | None = None
    memory_bytes: int | None = None  # what its last started instance held on its node (READY event)
    last_error: str | None = None
    failed_nodes: dict[str, float] = field(default_factory=dict)  # node -> excluded until
    # After a load failed because of the checkpoint itself, unrequested starts (min_instances)
    # wait until then instead of failing in a loop; a new request still tries at once.
    backoff_until: float = 0.0
    timer: asyncio.TimerHandle | None = None
    next_order: int = 0

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.slots.values())

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self.slots.values():
            counts[slot.state] = counts.get(slot.state, 0) + 1
        return counts

    def free_slot(self) -> InstanceSlot | None:
        """The ready instance with the fewest requests in flight below target; ties go to the
        oldest, so a light load packs onto few instances and the others can idle out."""
        best: InstanceSlot | None = None
        limit = self.record.target_concurrency
        for slot in self.slots.values():
            if slot.state == "ready" and slot.in_flight < limit:
                if best is None or (slot.in_flight, slot.order) < (best.in_flight, best.order):
                    best = slot
        return best


class Router:
    def __init__(self, clock: Callable[[], float], on_demand: Callable[[str], None]) -> None:
        self.clock = clock
        self.on_demand = on_demand
        self.deployments: dict[str, DeploymentState] = {}

    # -- deployments --------------------------------------------------------------------------

    def add(self, record: DeploymentRecord) -> DeploymentState:
        state = self.deployments.get(record.name)
        if state is None:
            state = self.deployments[record.name] = DeploymentState(record)
        else:
            if (state.record.checkpoint, state.record.backend) != (record.checkpoint, record.backend):
                state.memory_bytes = None  # learned for the old model
            state.record = record
        return state

    def get(self, name: str) -> DeploymentState:
        state = self.deployments.get(name)
        if state is None:
            raise ModelNotFound(name, list(self.deployments))
        return state

    def remove(self, name: str) -> DeploymentState | None:
        state = self.deployments.pop(name, None)
        if state is not None:
            if state.timer is not None:
                state.timer.cancel()
            self.fail_queued(state, Gone(f"the deployment {name!r} was deleted while the request waited"))
        return state

    # -- requests -----------------------------------------------------------------------------

    def try_acquire(self, name: str) -> Lease | None:
        """The warm path: a slot now, or None (queue non-empty or no free slot)."""
        state = self.get(name)
        if state.queue:
            return None  # FIFO: queued requests go first
        slot = state.free_slot()
        if slot is None:
            return None
        now = self.clock()
        return self._lease(slot, now, now, queued=False)

    async def acquire(self, name: str, on_progress: ProgressFn | None = None) -> Lease:
        """A slot for one request: at once when free, else after waiting in the queue.

        Raises QueueFull (429) when the queue is at its limit, Unavailable when no instance came
        up within the deployment's request timeout, Gone when the deployment is deleted meanwhile.
        Cancelling the caller (client gone) takes the request out of the queue.
        """
        lease = self.try_acquire(name)
        if lease is not None:
            return lease
        state = self.get(name)
        if len(state.queue) >= state.record.queue_limit:
            raise QueueFull(
                f"the queue of {name!r} is full ({state.record.queue_limit} requests waiting); retry later",
                self.retry_after_s(state),
            )
        ticket = Ticket(self.clock(), on_progress)
        state.queue.append(ticket)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(state.record.request_timeout_s, self._expire, state, ticket)
        try:
            self.on_demand(name)
            self.pump(state)
            return await ticket.future
        except BaseException:
            self._abandon(state, ticket)
            raise
        finally:
            timer.cancel()

    def _expire(self, state: DeploymentState, ticket: Ticket) -> None:
        if not ticket.future.done():
            ticket.future.set_exception(Unavailable(self._timeout_message(state)))

    def _abandon(self, state: DeploymentState, ticket: Ticket) -> None:
        future = ticket.future
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())  # dispatched just as the caller gave up
            return
        future.cancel()
        try:
            state.queue.remove(ticket)
        except ValueError:
            pass
        if state.name in self.deployments:
            self.on_demand(state.name)

    def release(self, lease: Lease, duration_s: float | None = None) -> None:
        """The request is done (finished, failed or cancelled): free its slot, serve the queue."""
        if lease.released:
            return
        lease.released = True
        slot = lease.slot
        slot.in_flight -= 1
        if slot.in_flight == 0:
            slot.idle_since = self.clock()
        state = self.deployments.get(slot.deployment)
        if state is None:
            return
        if duration_s is not None:
            old = state.duration_ewma_s
            state.duration_ewma_s = duration_s if old is None else 0.8 * old + 0.2 * duration_s
        self.pump(state)
        if slot.in_flight == 0:
            self.on_demand(state.name)  # an idle instance may now be scaled in later

    def hold(self, slot: InstanceSlot) -> Lease:
        """A lease that is no request: keeps a migration's destination from counting as idle
        (and being scaled in) before the moved requests arrive. Release it like any lease."""
        now = self.clock()
        return self._lease(slot, now, now, queued=False)

    def move(self, lease: Lease, slot: InstanceSlot) -> None:
        """A request migrated: its lease goes on at `slot` (its old instance may now be idle)."""
        old = lease.slot
        if old is slot or lease.released:
            return
        old.in_flight -= 1
        if old.in_flight == 0:
            old.idle_since = self.clock()
        slot.in_flight += 1
        slot.idle_since = None
        lease.slot = slot
        state = self.deployments.get(old.deployment)
        if state is not None:
            self.pump(state)
            if old.in_flight == 0:
                self.on_demand(state.name)  # a retired source is unloaded once its last request left

    def _lease(self, slot: InstanceSlot, arrived_at: float, now: float, queued: bool) -> Lease:
        cold = slot.first_token_pending and queued
        if cold:
            slot.first_token_pending = False
        slot.in_flight += 1
        slot.idle_since = None
        return Lease(slot, arrived_at, now, queued, cold)

    def pump(self, state: DeploymentState) -> None:
        """Hand free slots to queued requests, oldest first."""
        while state.queue:
            slot = state.free_slot()
            if slot is None:
                return
            ticket = state.queue.popleft()
            if ticket.future.done():
                continue  # its caller gave up
            ticket.future.set_result(self._lease(slot, ticket.enqueued_at, self.clock(), queued=True))

    def fail_queued(self, state: DeploymentState, error: ControllerError) -> None:
        while state.queue:
            ticket = state.queue.popleft()
            if not ticket.future.done():
                ticket.future.set_exception(error)

    # -- instances ----------------------------------------------------------------------------

    def add_slot(self, slot: InstanceSlot) -> None:
        state = self.get(slot.deployment)
        slot.order = state.next_order
        state.next_order += 1
        state.slots[slot.id] = slot

    def slot_ready(self, slot: InstanceSlot) -> None:
        slot.state = "ready"
        slot.progress = 100.0
        slot.ready_at = slot.idle_since = self.clock()
        state = self.deployments.get(slot.deployment)
        if state is not None:
            slot.first_token_pending = bool(state.queue)
            self.pump(state)

    def retire(self, slot: InstanceSlot) -> None:
        """No new requests for this instance (it is stopping); in-flight ones finish."""
        slot.state = "stopping"

    def remove_slot(self, slot: InstanceSlot) -> None:
        state = self.deployments.get(slot.deployment)
        if state is not None:
            state.slots.pop(slot.id, None)

    def progress(self, state: DeploymentState, percent: float, message: str) -> None:
        """Tell the requests waiting in the queue how far the instance they wait for got."""
        for ticket in state.queue:
            if ticket.on_progress is not None and not ticket.future.done():
                ticket.on_progress(percent, message)

    # -- estimates ----------------------------------------------------------------------------

    def retry_after_s(self, state: DeploymentState) -> float:
        """How long until a queued request would likely get a slot: what a client should wait."""
        now = self.clock()
        ready = sum(1 for s in state.slots.values() if s.state == "ready")
        if ready and state.duration_ewma_s:
            capacity = ready * state.record.target_concurrency
            return max(1.0, state.duration_ewma_s * math.ceil((len(state.queue) + 1) / capacity))
        starting = [s.expected_ready_at - now for s in state.slots.values()
                    if s.state in ("starting", "loading") and s.expected_ready_at is not None]
        if starting:
            return max(1.0, min(starting))
        return 5.0

    def _timeout_message(self, state: DeploymentState) -> str:
        message = (
            f"no instance of {state.name!r} could take the request within its request timeout "
            f"({state.record.request_timeout_s:g} s)"
        )
        if state.last_error:
            message += f"; last error: {state.last_error}"
        return message
