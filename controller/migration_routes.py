"""HTTP routes of live migration: move an instance, drain a node, follow what happens.

    POST /v1/instances/{id}/migrate   {"node": "<node id>", "mode": "auto|kv|tokens"} (all optional)
    GET  /v1/migrations               recent migrations, newest first
    GET  /v1/migrations/{id}
    POST /v1/nodes/{id}/drain         every instance moves off (or finishes there); then "drained"
    GET  /v1/nodes/{id}/drain         that drain's record
    POST /v1/nodes/{id}/undrain       the node takes new instances again

A migration or drain runs in the background: the answer is 202 with its record at once, or 200
with the final record when the call asks `?wait=true`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ember.controller.errors import NotFound
from ember.controller.migrations import MigrateBody

if TYPE_CHECKING:
    from ember.controller.app import Controller

DRAIN_POLL_S = 0.2


def migration_router(ctl: Controller) -> APIRouter:
    router = APIRouter(tags=["admin"])
    migrations = ctl.migrations

    @router.post("/v1/instances/{instance_id}/migrate", summary="Move an instance and its running requests")
    async def migrate(instance_id: str, body: MigrateBody | None = None, wait: bool = False) -> JSONResponse:
        body = body or MigrateBody()
        record = migrations.migrate(instance_id, node=body.node, mode=body.mode)
        if not wait:
            return JSONResponse(record.model_dump(), status_code=202)
        record = await migrations.wait(record.id)
        return JSONResponse(record.model_dump(), status_code=200)

    @router.get("/v1/migrations")
    async def list_migrations() -> dict:
        records = sorted(migrations.records.values(), key=lambda r: r.started_at, reverse=True)
        return {"object": "list", "data": [r.model_dump() for r in records]}

    @router.get("/v1/migrations/{migration_id}")
    async def get_migration(migration_id: str) -> dict:
        return migrations.get(migration_id).model_dump()

    @router.post("/v1/nodes/{node_id}/drain", summary="Move everything off a node, then mark it drained")
    async def drain(node_id: str, wait: bool = False) -> JSONResponse:
        record = migrations.drain(node_id)
        if not wait:
            return JSONResponse(record.model_dump(), status_code=202)
        while record.finished_at is None and migrations.drains.get(node_id) is record:
            await asyncio.sleep(DRAIN_POLL_S)
        return JSONResponse(record.model_dump(), status_code=200)

    @router.get("/v1/nodes/{node_id}/drain", summary="The node's latest drain")
    async def get_drain(node_id: str) -> dict:
        record = migrations.drains.get(node_id)
        if record is None:
            ctl.get_node(node_id)  # 404 for an unknown node
            raise NotFound(f"node {node_id!r} was not drained", param="id", code="drain_not_found")
        return record.model_dump()

    @router.post("/v1/nodes/{node_id}/undrain", summary="Let a drained node take new instances again")
    async def undrain(node_id: str) -> dict:
        migrations.undrain(node_id)
        return ctl.get_node(node_id).model_dump()

    return router
