"""The operator's view of a controller: `GET /` (an HTML page), `GET /v1/status` (the same as JSON).

One snapshot (`status_snapshot`) feeds the page, the JSON and `ember status`, so the three always
agree. The page is rendered on the server (Jinja2) and refreshes itself by fetching
`/status/fragment` — the same template without the page around it — every couple of seconds:
no build step, no CDN, nothing to download, and it reads fine with JavaScript off. Its CSS and
its one small script ship inside the package (controller/static/).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, Field

from ember.controller.errors import ControllerError, NotFound
from ember.controller.models import Deployment, Instance, Node
from ember.controller.recent_events import ColdStart, Migration

if TYPE_CHECKING:
    import jinja2

    from ember.controller.app import Controller

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"
REFRESH_MS = 2000
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml"}
NO_STORE = {"Cache-Control": "no-store"}


class ControllerInfo(BaseModel):
    version: str
    uptime_s: float
    state_store: str = Field(description="the state store URL, without credentials")
    now: float = Field(description="unix time of this snapshot")


class Summary(BaseModel):
    nodes: int
    nodes_up: int
    deployments: int
    instances: dict[str, int] = Field(default_factory=dict, description="instances by state")
    queued: int = Field(0, description="requests waiting in deployment queues")
    in_flight: int = Field(0, description="requests running on instances")


class Status(BaseModel):
    """GET /v1/status: everything the status page shows, in one consistent snapshot."""

    object: str = "status"
    controller: ControllerInfo
    summary: Summary
    nodes: list[Node]
    deployments: list[Deployment]
    instances: list[Instance]
    cold_starts: list[ColdStart] = Field(description="the last 50 instance starts, newest first")
    migrations: list[Migration] = Field(description="the last 50 migrations, newest first")


@cache
def _version() -> str:
    try:
        return metadata.version("ember")
    except metadata.PackageNotFoundError:
        return "unknown"


def redact_url(url: str) -> str:
    """A store URL fit to show: redis://:secret@host/0 -> redis://host/0."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def status_snapshot(ctl: Controller) -> Status:
    nodes = ctl.list_nodes()
    deployments = ctl.list_deployments()
    instances = ctl.list_instances()
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.state] = counts.get(instance.state, 0) + 1
    return Status(
        controller=ControllerInfo(version=_version(), uptime_s=max(0.0, ctl.clock() - ctl.started_at),
                                  state_store=redact_url(ctl.store.url), now=time.time()),
        summary=Summary(nodes=len(nodes), nodes_up=sum(n.state == "up" for n in nodes), deployments=len(deployments),
                        instances=counts, queued=sum(d.queued for d in deployments),
                        in_flight=sum(d.in_flight for d in deployments)),
        nodes=nodes, deployments=deployments, instances=instances,
        cold_starts=ctl.recent.cold_starts(), migrations=ctl.recent.migrations(),
    )


# ---- formatting (Jinja2 filters) -------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if not n:
        return "0 B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def seconds(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.3g} s"
    if s < 3600:
        minutes, rest = divmod(round(s), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(s) // 60, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def ago(then: float | None, now: float) -> str:
    if not then:
        return "never"
    delta = max(0.0, now - then)
    if delta < 1:
        return "just now"
    if delta < 60:
        return f"{delta:.0f} s ago"
    return f"{seconds(delta)} ago"


def gbps(v: float | None) -> str:
    return f"{v:.2f} GB/s" if v else "not measured"


def percent(part: float | None, whole: float | None) -> float:
    if not whole or not part:
        return 0.0
    return max(0.0, min(100.0, 100.0 * part / whole))


def short_uri(uri: str) -> str:
    """The last path element of a checkpoint path or s3:// URI (the full one goes in a tooltip)."""
    trimmed = uri.rstrip("/")
    name = trimmed.rsplit("/", 1)[-1] or trimmed
    return f"s3://…/{name}" if uri.startswith("s3://") and "/" in trimmed[5:] else name


def ordered_tiers(tiers: dict) -> list[tuple[str, object]]:
    """Fastest tier first (dram, disk), then any other in name order."""
    rank = {"dram": 0, "disk": 1}
    return sorted(tiers.items(), key=lambda item: (rank.get(item[0], 2), item[0]))


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(bytes=human_bytes, seconds=seconds, gbps=gbps, short_uri=short_uri)
    env.globals.update(ago=ago, percent=percent, ordered_tiers=ordered_tiers)
    return env


def _context(status: Status) -> dict:
    by_uri: dict[str, list[str]] = {}
    for d in status.deployments:
        by_uri.setdefault(d.checkpoint, []).append(d.name)
    by_deployment: dict[str, list[Instance]] = {}
    for i in status.instances:
        by_deployment.setdefault(i.deployment, []).append(i)
    return {"s": status, "now": status.controller.now, "deployments_of": by_uri, "instances_of": by_deployment,
            "refresh_ms": REFRESH_MS}


def render_page(status: Status) -> str:
    return _environment().get_template("status.html").render(_context(status))


def render_fragment(status: Status) -> str:
    return _environment().get_template("status_body.html").render(_context(status))


def render_locked(message: str) -> str:
    """The page without data, for a browser that has not given an API key yet (its script asks for one)."""
    return _environment().get_template("status.html").render(s=None, locked=message, refresh_ms=REFRESH_MS)


Authorize = Callable[[Request], Awaitable[object]]


def status_router(ctl: Controller, authorize: Authorize | None = None) -> APIRouter:
    """The page, its fragment, /v1/status and the page's static files.

    `authorize(request)` (when the controller checks API keys) raises a ControllerError for a
    request that may not see the status. A browser cannot put a key on a page load, so `/` then
    answers the page without data and its script asks for the key, keeps it in the tab's
    sessionStorage and sends it as `Authorization: Bearer` with each refresh.
    """
    router = APIRouter()

    async def check(request: Request) -> None:
        if authorize is not None:
            await authorize(request)

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        try:
            await check(request)
        except ControllerError as exc:
            if exc.status not in (401, 403):
                raise
            return HTMLResponse(render_locked(exc.message), status_code=exc.status, headers=NO_STORE)
        return HTMLResponse(render_page(status_snapshot(ctl)), headers=NO_STORE)

    @router.get("/status/fragment", response_class=HTMLResponse, include_in_schema=False)
    async def fragment(request: Request) -> HTMLResponse:
        await check(request)
        return HTMLResponse(render_fragment(status_snapshot(ctl)), headers=NO_STORE)

    @router.get("/v1/status", response_model=Status, tags=["admin"],
                summary="Nodes, deployments, instances, recent cold starts and migrations in one snapshot")
    async def status(request: Request) -> Status:
        await check(request)
        return status_snapshot(ctl)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
            raise NotFound(f"no static file {name!r}", param="name", code="not_found")
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"Cache-Control": "max-age=300"})

    return router
