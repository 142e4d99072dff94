"""What just happened: the last cold starts and migrations, kept in memory for the status page.

Prometheus histograms say how cold starts go on average; an operator looking at one slow start
needs the start itself — which tier it came from, what the scheduler estimated, where the time
went. These rings keep the last few of each (bounded: a busy controller never grows them), and
are lost on restart on purpose: the store keeps state, not history.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_LIMIT = 50


class ColdStart(BaseModel):
    """One instance start, from the scheduler's decision to the worker's READY."""

    instance: str
    deployment: str
    node: str
    tier: str = Field(description='where the weights came from: "dram", "disk" or "s3" ("unknown" if not said)')
    estimated_s: float | None = Field(None, description="the scheduler's time-to-ready estimate, seconds")
    actual_s: float = Field(description="Load call to READY as the controller measured it, seconds")
    fetch_s: float = Field(0.0, description="S3 to disk cache, seconds")
    load_s: float = Field(0.0, description="cache tier to device, seconds")
    init_s: float = Field(0.0, description="model initialisation, seconds")
    bytes: int = 0
    finished_at: float = Field(description="unix time of READY")


MigrationState = Literal["running", "done", "failed"]


class Migration(BaseModel):
    """One instance's requests moving to another node (DESIGN.md, live migration)."""

    id: str
    instance: str
    deployment: str
    source: str = Field(description="node id")
    target: str | None = Field(None, description="node id (None until the scheduler picked one)")
    mode: str = Field("", description='"kv" (KV blocks sent), "recompute" (destination prefills from tokens), '
                                      "or both joined by +")
    reason: str = Field("", description='"scheduler", "drain" or "operator"')
    state: MigrationState = "running"
    requests: int = Field(0, description="requests handed over")
    started_at: float = Field(description="unix time")
    finished_at: float | None = None
    error: str | None = None


class RecentEvents:
    """Bounded rings of recent cold starts and migrations, newest first when listed."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._cold_starts: deque[ColdStart] = deque(maxlen=limit)
        self._migrations: OrderedDict[str, Migration] = OrderedDict()

    def cold_start(self, record: ColdStart) -> None:
        self._cold_starts.append(record)

    def migration(self, record: Migration) -> None:
        """Add a migration, or update it in place (same id) as it progresses; the oldest fall off."""
        self._migrations[record.id] = record
        while len(self._migrations) > self.limit:
            self._migrations.popitem(last=False)

    def cold_starts(self) -> list[ColdStart]:
        return list(reversed(self._cold_starts))

    def migrations(self) -> list[Migration]:
        return list(reversed(self._migrations.values()))
